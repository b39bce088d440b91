"""`engine feedback`: human feedback in a browser, AI feedback from reward functions, and the export.

The commands load a policy (engine.chat_session's locator) and sample with the workers' KV-cache
generator; engine/feedback/ holds the store, the server and its page, the sampler, AI ranking and the
export.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..console import err, fail, finite, out
from ..errors import EngineError

feedback_app = typer.Typer(
    help="Human feedback: rank sampled responses in a browser, rank them with reward functions, export.",
    no_args_is_help=True,
)
FeedbackTarget = Annotated[
    Path, typer.Argument(help="a run directory (runs/<name>), a stage's folder, or one checkpoint folder")
]
FeedbackDb = Annotated[
    Path | None, typer.Option("--db", help="the feedback database (default: RUN/feedback/feedback.db)")
]
FeedbackPrompts = Annotated[
    Path | None,
    typer.Option("--prompts", help='a JSONL file of {"prompt": ..., "reference": ...} (default: the run\'s prompts)'),
]
FeedbackSplit = Annotated[str, typer.Option("--split", help="which split of the run's prompts: train, valid or test")]
FeedbackTemperature = Annotated[float, typer.Option("--temperature", min=0.0, max=100.0, callback=finite, help="sampling temperature (0: greedy)")]
FeedbackTopK = Annotated[int, typer.Option("--top-k", min=0, help="sample from the k likeliest tokens (0: all)")]
FeedbackTopP = Annotated[float, typer.Option("--top-p", min=0.0, max=1.0, callback=finite, help="nucleus sampling mass (1: all)")]
FeedbackMaxNew = Annotated[
    int | None, typer.Option("--max-new-tokens", min=1, help="response length limit (default: half the context)")
]
FeedbackSeed = Annotated[int, typer.Option("--seed", help="sampling seed (with the prompt's index)")]
FeedbackTokenizer = Annotated[
    Path | None, typer.Option("--tokenizer", help="the run's tokenizer.json, when meta.json's path is elsewhere")
]


@feedback_app.command("serve")
def feedback_serve(
    target: FeedbackTarget,
    db: FeedbackDb = None,
    prompts: FeedbackPrompts = None,
    split: FeedbackSplit = "train",
    k: Annotated[int, typer.Option("--k", min=2, max=9, help="responses per prompt, side by side")] = 4,
    host: Annotated[
        str, typer.Option("--host", help="address to bind; beyond loopback a token is required")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=1, max=65535)] = 8765,
    token: Annotated[
        str | None,
        typer.Option("--token", envvar="ENGINE_FEEDBACK_TOKEN", help="access token every request must carry"),
    ] = None,
    overlap: Annotated[
        float, typer.Option("--overlap", min=0.0, max=1.0, callback=finite, help="fraction of items given to a second reviewer")
    ] = 0.2,
    ahead: Annotated[
        int, typer.Option("--ahead", min=1, max=256, help="items kept sampled ahead of the reviewers")
    ] = 8,
    temperature: FeedbackTemperature = 1.0,
    top_k: FeedbackTopK = 0,
    top_p: FeedbackTopP = 1.0,
    max_new_tokens: FeedbackMaxNew = None,
    seed: FeedbackSeed = 0,
    tokenizer: FeedbackTokenizer = None,
) -> None:
    """Serve the review page: reviewers rank K sampled responses per prompt, flag, skip or write a better one."""
    from .sampler import SamplingOptions, setup
    from .server import check_binding, serve

    try:
        check_binding(host, token)
        found, prompt_set, path = setup(target, prompts, split, db, tokenizer)
        err.print(f"{len(prompt_set.rows)} prompts; judgments go to {path}; loading {found.checkpoint}", markup=False)
        serve(found, prompt_set, db=path, host=host, port=port, token=token, k=k, ahead=ahead, overlap=overlap,
              options=SamplingOptions(temperature, top_k, top_p, max_new_tokens, seed),
              announce=lambda text: err.print(text, markup=False))  # fmt: skip
    except EngineError as exc:
        raise fail(exc) from None


@feedback_app.command("ai")
def feedback_ai(
    target: FeedbackTarget,
    reward: Annotated[
        list[str], typer.Option("--reward", help="a reward plugin, NAME or NAME:{json params} (repeat to sum several)")
    ],
    db: FeedbackDb = None,
    prompts: FeedbackPrompts = None,
    split: FeedbackSplit = "train",
    k: Annotated[int, typer.Option("--k", min=2, max=64, help="responses per prompt")] = 4,
    n: Annotated[int, typer.Option("--n", min=1, help="prompts to rank (after those ranked before)")] = 64,
    temperature: FeedbackTemperature = 1.0,
    top_k: FeedbackTopK = 0,
    top_p: FeedbackTopP = 1.0,
    max_new_tokens: FeedbackMaxNew = None,
    seed: FeedbackSeed = 0,
    tokenizer: FeedbackTokenizer = None,
) -> None:
    """AI feedback: sample K responses per prompt and store their ranking by reward functions."""
    from .ai import reward_functions, run_ai_feedback
    from .sampler import SamplingOptions, setup

    try:
        reward_functions(reward)
        found, prompt_set, path = setup(target, prompts, split, db, tokenizer)
        summary = run_ai_feedback(found, prompt_set, db=path, rewards=reward, k=k, limit=n,
                                  options=SamplingOptions(temperature, top_k, top_p, max_new_tokens, seed))  # fmt: skip
    except EngineError as exc:
        raise fail(exc) from None
    out.print(f"{summary.reviewer}: ranked {summary.judgments} prompts × {k} responses into {path}; "
              f"{summary.mixed} with differing scores (these give preference pairs), mean score {summary.mean_score:.3f}",
              markup=False)  # fmt: skip


@feedback_app.command("export")
def feedback_export(
    db: Annotated[Path, typer.Argument(help="the feedback database")],
    out_dir: Annotated[Path, typer.Option("--out", help="the folder to write (created; its files are replaced)")],
    pairs: Annotated[
        str, typer.Option("--pairs", help="all: every ordered pair of a ranking; best: best vs each worse")
    ] = "all",
    ai: Annotated[bool, typer.Option("--ai/--no-ai", help="include AI feedback (reviewers named ai:...)")] = True,
) -> None:
    """Export judgments: rankings → preference pairs, written responses → conversations (JSONL)."""
    from .export import export

    if pairs not in ("all", "best"):
        raise fail(EngineError(f"--pairs {pairs!r}: use all or best"))
    try:
        manifest = export(db, out_dir, pairs="all" if pairs == "all" else "best", ai=ai)
    except EngineError as exc:
        raise fail(exc) from None
    out.print(f"{manifest['judgments']} judgments by {len(manifest['reviewers'])} reviewers → {manifest['preferences']} "
              f"preference pairs and {manifest['conversations']} conversations in {out_dir}", markup=False)  # fmt: skip
