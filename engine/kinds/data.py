"""The `data` kind: read sources, clean, deduplicate, tokenize, write shards (docs/stages/data.md)."""

from __future__ import annotations

import math
import re
from collections.abc import Iterator

from .. import plugin
from ..errors import Problem
from ..schema import DataStage
from .base import RuleContext, StageKind
from .checks import installed, plugin_params, plugin_table


def rules(where: str, stage: DataStage, ctx: RuleContext) -> Iterator[Problem]:
    sources = plugin_table(where, plugin.data_sources)
    if isinstance(sources, Problem):
        yield sources
        sources = {}
    seen: set[str] = set()
    for i, src in enumerate(stage.sources):
        path = f"{where}.sources[{i}]"
        if src.name in seen:
            yield Problem(f"{path}.name", f"={src.name!r} is used by another source", "give each source a unique name")
        seen.add(src.name)
        found = yield from installed(f"{path}.plugin", src.plugin, sources, "data source")
        if found is None:
            continue
        if src.records not in found.kinds:
            yield Problem(
                f"{path}.records",
                f"={src.records!r} is not produced by plugin {src.plugin!r}",
                f"it yields: {', '.join(sorted(found.kinds))}",
            )
        yield from plugin_params(f"{path}.params", found.params, src.params)
    s = stage.splits
    if not math.isclose(s.train + s.valid + s.test, 1.0, abs_tol=1e-6):
        yield Problem(
            f"{where}.splits",
            f"train+valid+test = {s.train}+{s.valid}+{s.test} = {s.train + s.valid + s.test:g}",
            "make the fractions add up to 1",
        )
    if s.train <= 0:
        yield Problem(f"{where}.splits.train", "=0 leaves nothing to train on", "give it a positive fraction")
    for i, pattern in enumerate(stage.cleaning.blocklist):
        try:
            re.compile(pattern)
        except re.error as exc:
            yield Problem(
                f"{where}.cleaning.blocklist[{i}]", f"={pattern!r} is not a regular expression: {exc}", "fix it"
            )
    if stage.cleaning.max_chars is not None and stage.cleaning.max_chars < stage.cleaning.min_chars:
        yield Problem(
            f"{where}.cleaning.max_chars",
            f"={stage.cleaning.max_chars} < min_chars={stage.cleaning.min_chars}",
            "raise it",
        )
    if stage.shards > 1 and ctx.recipe.tokenizer.kind == "train":
        yield Problem(
            f"{where}.shards",
            f"={stage.shards} with tokenizer.kind=train: each shard tokenises its own documents, so the tokenizer "
            "must exist before the stage starts",
            "train it in an unsharded run and give tokenizer: {kind: file, path: .../tokenizer.json}, or set shards: 1",
        )


KIND = StageKind(
    name="data",
    model=DataStage,
    produces="data",
    worker="engine.worker.stages.collect",
    rules=rules,
    charts=(),
)
