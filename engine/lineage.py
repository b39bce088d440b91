"""Runs, rounds and versioned artifacts: what iterative improvement leaves on disk.

Every run directory holds `run.json`: the recipe's name and hash, its round, the run it continued
from, and when it was started. A run started from scratch is round 1; `engine run RECIPE
--continue-from RUN` starts round k+1 from round k's policy and reward model (`continuation`), in a
new run directory (`runs/<name>-r<k+1>` unless `run_dir` is given).

Every stage that finishes writes `<stage>/lineage.json` next to its `done.json`: the artifact's
version (v<round>), kind, the recipe hash and the job's cache key, the data manifests it read (their
sha256), its parent artifacts (the checkpoints it started from, from the checkpoint's meta.json)
and its held-out metrics. `engine lineage ARTIFACT` follows the parents back to the first round;
`engine runs` lists the runs under a folder. Nothing here imports torch.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
from pathlib import Path
from typing import Any

from .artifacts import read_json, write_json_atomic
from .compile import Job, Plan
from .errors import EngineError
from .kinds import KINDS, either
from .summary import held_out, read_metrics

RUN_RECORD = "run.json"
LINEAGE = "lineage.json"


def write_run_record(plan: Plan, *, round_: int, continued_from: str | None) -> None:
    """run.json, written once when a run directory is first used (kept on reruns)."""
    path = Path(plan.run_dir) / RUN_RECORD
    if path.is_file():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, {
        "name": plan.recipe, "recipe_hash": plan.recipe_hash, "round": round_, "continued_from": continued_from,
        "started": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    })  # fmt: skip


def run_round(run_dir: Path) -> int:
    try:
        return int(read_json(run_dir / RUN_RECORD).get("round", 1))
    except (OSError, ValueError):
        return 1


def final_checkpoint(output: Path) -> Path | None:
    """The newest complete checkpoint of a checkpoint folder (its `latest` pointer)."""
    try:
        name = (output / "latest").read_text(encoding="utf-8").strip()
    except OSError:
        return None
    return output / name if name and (output / name / "meta.json").is_file() else None


def write_lineage(plan: Plan, job: Job) -> None:
    """The finished stage's lineage record (rank 0, after the stage's last checkpoint)."""
    output = Path(job.outputs[0].path)
    stage_dir = output.parent
    parents: list[str] = []
    checkpoint = final_checkpoint(output) if job.outputs[0].kind == "checkpoint" else None
    if checkpoint is not None:
        parents = list(read_json(checkpoint / "meta.json").get("parents", []))
    manifests = {}
    for art in job.inputs:
        manifest = Path(art.path) / "manifest.json"
        if art.kind == "dataset" and manifest.is_file():
            manifests[art.path] = hashlib.sha256(manifest.read_bytes()).hexdigest()
    lines = read_metrics(stage_dir)
    write_json_atomic(stage_dir / LINEAGE, {
        "artifact": str(checkpoint or output), "stage": job.name, "kind": job.kind,
        "version": f"v{run_round(Path(plan.run_dir))}", "run": plan.run_dir, "recipe": plan.recipe,
        "recipe_hash": plan.recipe_hash, "cache_key": job.cache_key, "data_manifests": manifests,
        "parents": parents, "held_out": held_out(job.kind, lines), "metrics": lines[-1] if lines else {},
    })  # fmt: skip


def stage_dir_of(artifact: Path) -> Path:
    """A stage folder from itself, its checkpoints/ folder, or one of its checkpoints."""
    for candidate in (artifact, artifact.parent, artifact.parent.parent):
        if (candidate / LINEAGE).is_file():
            return candidate
    raise EngineError(f"{artifact} is no finished stage of a run (no {LINEAGE} in it or above it); "
                      "give runs/<run>/<stage>, its checkpoints/ or one of its checkpoints")  # fmt: skip


def chain(artifact: Path) -> list[dict[str, Any]]:
    """The artifact's lineage record, then its parent's, back to a stage without parents (or one
    outside any run: an imported checkpoint, shown as `external`)."""
    records: list[dict[str, Any]] = []
    here: Path | None = stage_dir_of(artifact)
    seen: set[Path] = set()
    while here is not None and here.resolve() not in seen:
        seen.add(here.resolve())
        record = read_json(here / LINEAGE)
        records.append(record)
        parents = [Path(p) for p in record.get("parents", [])]
        here = None
        if parents:
            try:
                here = stage_dir_of(parents[0])
            except EngineError:
                records.append({"artifact": str(parents[0]), "stage": "-", "kind": "external", "version": "-",
                                "held_out": "-", "recipe_hash": ""})  # fmt: skip
    return records


def list_runs(root: Path) -> list[dict[str, Any]]:
    """Every run directory directly under root, oldest first."""
    if not root.is_dir():
        raise EngineError(f"{root} is not a folder of runs" + (" (it is a file)" if root.exists() else " (no such folder)")
                          + "; give the folder that holds the run directories, e.g. runs")  # fmt: skip
    runs = []
    for record_path in sorted(root.glob(f"*/{RUN_RECORD}")):
        run_dir = record_path.parent
        plan_path = run_dir / "plan.json"
        try:
            record = read_json(record_path)
            fields = {k: record[k] for k in ("name", "round", "continued_from", "started")}
            stages = [j["name"] for j in read_json(plan_path)["jobs"]] if plan_path.is_file() else []
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise EngineError(f"{run_dir}: its {RUN_RECORD} or plan.json cannot be read ({type(exc).__name__}: "
                              f"{exc}); restore or remove that run directory") from None  # fmt: skip
        done = [s for s in stages if (run_dir / s / "done.json").is_file()]
        runs.append({**fields, "run_dir": str(run_dir), "finished": f"{len(done)}/{len(stages)}"})
    return sorted(runs, key=lambda r: str(r.get("started", "")))


# -- the next round -------------------------------------------------------------------------------


def next_run_dir(earlier: Path, round_: int) -> str:
    base = re.sub(r"-r\d+$", "", earlier.name)
    return str(earlier.parent / f"{base}-r{round_}")


def continuation(plan: Plan, earlier: Path) -> tuple[list[str], list[str], int]:
    """(overrides, stages to run, round) that make this recipe the round after the run `earlier`.

    The tokenizer is the earlier run's (a model's vocabulary cannot change between rounds, and a
    tokenizer trained anew on a corpus with new sources would differ). What happens to each stage is its
    kind's `next_round` (engine.kinds): pretraining is not run again; SFT stages start from the earlier
    run's final policy (its last finished stage that produces a policy and runs every round: PPO, else
    SFT), reward-model stages from its last reward model. Data stages run (with whatever sources the
    recipe now has), and so does everything downstream.
    """
    path = earlier / "plan.json"
    if not path.is_file():
        raise EngineError(f"--continue-from {earlier}: not a run directory (no plan.json); give runs/<name>")
    before = Plan.model_validate(read_json(path))
    finished = [j for j in before.jobs if j.kind in KINDS and (Path(j.outputs[0].path).parent / "done.json").is_file()]
    final: dict[str, Path | None] = {}
    for what in ("policy", "reward_model"):
        last = [j for j in finished if KINDS[j.kind].produces == what and not KINDS[j.kind].next_round.skip]
        final[what] = final_checkpoint(Path(last[-1].outputs[0].path)) if last else None
    if not any(KINDS[j.kind].produces == "policy" and not KINDS[j.kind].next_round.skip for j in finished):
        kinds = [k.name for k in reversed(KINDS.values()) if k.produces == "policy" and not k.next_round.skip]
        raise EngineError(f"--continue-from {earlier}: the run has no finished {either(kinds)} stage to continue "
                          "from; finish it first (`engine run` it again)")  # fmt: skip
    overrides, stages = _same_tokenizer(final["policy"]), []
    for job in plan.jobs:
        rule = KINDS[job.kind].next_round
        if rule.skip:
            continue
        stages.append(job.name)
        start = final[rule.start_from] if rule.start_from else None
        if start is not None:
            overrides.append(f"stages.{job.name}.init_from={start.resolve()}")
    return overrides, stages, run_round(earlier) + 1


def _same_tokenizer(policy: Path | None) -> list[str]:
    """Overrides that make the data stage tokenize with the tokenizer the policy was trained with."""
    if policy is None:
        return []
    tokenizer = read_json(policy / "meta.json").get("tokenizer", {})
    path = Path(str(tokenizer.get("path", "")))
    if not path.is_file():
        raise EngineError(f"--continue-from: the tokenizer {path} that {policy} was trained with is gone; "
                          "the next round must tokenize with it: restore it, or run from the folder the run was made in")  # fmt: skip
    return ["~tokenizer", f"tokenizer={{kind: file, path: {json.dumps(str(path.resolve()))}}}"]
