"""The `engine` command line: validate, plan, run, status, cancel, runs, lineage, schema, plugins, export,
import, chat, report, feedback.

User errors print one message listing every problem and exit with code 2, without a traceback.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from .console import err, fail, finished_table, finite, out, plan_table
from .errors import EngineError, RecipeError
from .feedback.cli import feedback_app

if TYPE_CHECKING:
    from .compile import Job, Plan
    from .schema import Recipe

app = typer.Typer(
    name="engine",
    help="A declarative, recipe-compiled training engine for chat LLMs on Megatron-Core.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.add_typer(feedback_app, name="feedback")

RecipeArg = Annotated[Path, typer.Argument(help="recipe YAML file", show_default=False)]
OverridesArg = Annotated[
    list[str] | None,
    typer.Argument(help="overrides: key=value (dotted paths, e.g. stages.sft.training.lr=1e-5) or ~key"),
]
ForceOpt = Annotated[bool, typer.Option("--force", help="plan jobs whose memory estimate exceeds the GPU")]


def _compile(recipe: Path, overrides: list[str] | None, force: bool) -> tuple[Recipe, Plan]:
    """Load and compile, or exit with the recipe's problems (code 2)."""
    from .compile import compile_recipe
    from .load import load_recipe

    try:
        r = load_recipe(recipe, overrides or ())
        return r, compile_recipe(r, force=force, source=str(recipe))
    except EngineError as exc:
        raise fail(exc) from None


@app.command()
def validate(recipe: RecipeArg, overrides: OverridesArg = None) -> None:
    """Check a recipe: types, cross-field rules, plugins, references and memory estimates."""
    r, plan = _compile(recipe, overrides, force=False)
    from .compile.estimate import human_count

    params = next((j.estimate.params.total for j in plan.jobs if j.estimate), 0)
    out.print(
        f"{recipe}: valid — recipe {r.name!r}, {len(plan.jobs)} stages ({', '.join(r.stages)}), "
        f"{human_count(params)} parameters, cluster {plan.cluster.name}",
        markup=False,
    )


@app.command()
def plan(
    recipe: RecipeArg,
    overrides: OverridesArg = None,
    json_out: Annotated[bool, typer.Option("--json", help="print the plan as JSON")] = False,
    show_scripts: Annotated[
        bool, typer.Option("--show-scripts", help="print the sbatch script of every job (Slurm clusters)")
    ] = False,
    force: ForceOpt = False,
) -> None:
    """Compile a recipe and show its jobs with layouts and estimates."""
    _, p = _compile(recipe, overrides, force)
    if json_out:
        sys.stdout.write(p.to_json())
        return
    if show_scripts:
        from .launch.slurm import show_scripts as scripts

        if p.cluster.launcher != "slurm":
            raise fail(EngineError(f"cluster={p.cluster.name!r} runs jobs locally, without sbatch scripts; "
                                    "name a Slurm cluster profile (e.g. cluster=h100) to see them"))  # fmt: skip
        try:
            sys.stdout.write(scripts(p))
        except EngineError as exc:
            raise fail(exc) from None
        return
    out.print(plan_table(p))


@app.command()
def run(
    recipe: RecipeArg,
    overrides: OverridesArg = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="compile and show the commands; launch nothing")] = False,
    force: ForceOpt = False,
    stages: Annotated[
        str | None, typer.Option("--stages", help="comma-separated stage names to run (default: all)")
    ] = None,
    wait: Annotated[
        bool, typer.Option("--wait", help="Slurm: wait until the submitted chain has finished, then show its status")
    ] = False,
    continue_from: Annotated[
        Path | None,
        typer.Option("--continue-from", help="start the next round from this run's policy and reward model"),
    ] = None,
) -> None:
    """Compile a recipe and run its jobs (locally, or on Slurm per the cluster profile)."""
    from .launch import render_local, select
    from .launch.local import run_local
    from .lineage import write_run_record

    overrides = list(overrides or [])
    round_ = 1
    if continue_from is not None:
        overrides, stages, round_, p = _next_round(recipe, overrides, force, continue_from, stages)
    else:
        _, p = _compile(recipe, overrides, force)
    out.print(plan_table(p))
    # One path of checks: a dry run refuses what a run would refuse, before it shows anything to launch.
    jobs, problems = select(p, stages.split(",") if stages else None)
    if problems:
        raise fail(RecipeError(problems, source=str(recipe)))
    if dry_run and p.cluster.launcher == "slurm":
        from .launch.slurm import show_scripts as scripts

        try:
            sys.stdout.write(scripts(p, jobs))
        except EngineError as exc:
            raise fail(exc) from None
        out.print("dry run: nothing was submitted")
        return
    if dry_run:
        for job in jobs:
            # What a shell would run: every value quoted (a run directory may hold spaces or quotes).
            env = [f"{k}={shlex.quote(v)}" for k, v in job.env.items()]
            out.print(f"[bold]{job.name}[/]: ", end="")
            out.print(" ".join([*env, shlex.join(render_local(job))]), markup=False, soft_wrap=True)
        out.print("dry run: nothing was launched")
        return
    write_run_record(p, round_=round_, continued_from=str(continue_from) if continue_from else None)
    if p.cluster.launcher == "slurm":
        _submit(p, jobs, _resolved_yaml(recipe, overrides), wait=wait)
        return
    try:
        done = run_local(p, jobs, recipe_text=_resolved_yaml(recipe, overrides))
    except EngineError as exc:
        raise fail(exc) from None
    out.print(finished_table(done))


def _next_round(
    recipe: Path, overrides: list[str], force: bool, earlier: Path, stages: str | None
) -> tuple[list[str], str, int, Plan]:
    """Overrides and stages that make this recipe the round after the run `earlier`, its round and plan."""
    from .lineage import continuation, next_run_dir

    _, first = _compile(recipe, overrides, force)
    try:
        extra, names, round_ = continuation(first, earlier)
    except EngineError as exc:
        raise fail(exc) from None
    if not any(o.startswith("run_dir=") for o in overrides):
        extra.append(f"run_dir={next_run_dir(earlier, round_)}")
    combined = [*overrides, *extra]
    _, p = _compile(recipe, combined, force)
    if Path(p.run_dir).resolve() == earlier.resolve():
        raise fail(EngineError(f"run_dir={p.run_dir!r} is the run being continued; the next round needs its own "
                                "run directory: drop the run_dir override or give another"))  # fmt: skip
    out.print(f"round {round_}: continuing from {earlier} into {p.run_dir}", markup=False)
    return combined, stages or ",".join(names), round_, p


def _submit(p: Plan, jobs: list[Job], recipe_text: str, *, wait: bool) -> None:
    from .launch import slurm

    try:
        slurm.submit(p, jobs, recipe_text=recipe_text)
        if not wait:
            out.print(f"submitted; follow it with `engine status {p.run_dir}`", markup=False)
            return
        states = slurm.wait(Path(p.run_dir))
    except EngineError as exc:
        raise fail(exc) from None
    _show_status(Path(p.run_dir), states)
    if any(j["state"] != "COMPLETED" and not j["skipped"] for j in states):
        raise typer.Exit(1)


RunArg = Annotated[Path, typer.Argument(help="a run directory (runs/<name>)", show_default=False)]


@app.command()
def status(run_dir: RunArg) -> None:
    """Show each job of a run: its state and where its log is."""
    from .launch import local, slurm

    try:
        states = slurm.status(run_dir) if (run_dir / slurm.SLURM_RECORD).is_file() else local.status(run_dir)
    except EngineError as exc:
        raise fail(exc) from None
    _show_status(run_dir, states)


@app.command()
def cancel(run_dir: RunArg) -> None:
    """Cancel a run's Slurm jobs that are still queued or running."""
    from .launch import slurm

    if not (run_dir / slurm.SLURM_RECORD).is_file():
        raise fail(EngineError(f"{run_dir} has no Slurm submission ({slurm.SLURM_RECORD}); "
                                "a local run stops with Ctrl-C"))  # fmt: skip
    try:
        ids = slurm.cancel(run_dir)
    except EngineError as exc:
        raise fail(exc) from None
    out.print(f"cancelled Slurm jobs {', '.join(ids)}" if ids else "nothing queued or running", markup=False)


@app.command()
def runs(
    root: Annotated[Path, typer.Argument(help="the folder holding run directories")] = Path("runs"),
) -> None:
    """List the runs under a folder: round, the run each continued from, finished stages."""
    from .lineage import list_runs

    try:
        found = list_runs(root)
    except EngineError as exc:
        raise fail(exc) from None
    table = Table("run", "recipe", "round", "continued from", "finished", "started", title=f"runs in {root}")
    for r in found:
        run = str(Path(r["run_dir"]).relative_to(root))
        table.add_row(run, r["name"], str(r["round"]), r["continued_from"] or "-", r["finished"], r["started"])
    out.print(table)


@app.command()
def lineage(
    artifact: Annotated[Path, typer.Argument(help="a finished stage (runs/<run>/<stage>) or one of its checkpoints")],
) -> None:
    """Show where a model artifact came from: its version, data, parents and metrics, back to round 1."""
    from .lineage import chain

    try:
        records = chain(artifact)
    except EngineError as exc:
        raise fail(exc) from None
    table = Table("version", "stage", "kind", "artifact", "recipe", "data", "held-out results", title="lineage")
    for r in records:
        data = ", ".join(f"{Path(p).parent.name}:{h[:8]}" for p, h in r.get("data_manifests", {}).items()) or "-"
        table.add_row(r["version"], r["stage"], r["kind"], r["artifact"], r.get("recipe_hash", "")[:12] or "-",
                      data, r["held_out"])  # fmt: skip
    out.print(table)


def _show_status(run_dir: Path, jobs: list[dict[str, str]]) -> None:
    from .launch.slurm import FAILED

    table = Table("stage", "job", "state", "exit", "log", title=f"run {run_dir}", title_justify="left")
    for j in jobs:
        table.add_row(j["name"], j["job_id"] or "-", j["state"], j.get("exit_code") or "-", j["log"] or "-")
    out.print(table)
    for j in jobs:
        if j["state"] in FAILED:
            out.print(f"failed: {j['name']} (Slurm job {j['job_id']}, {j['state']}); its log: {j['log']}", markup=False)


def _resolved_yaml(recipe: Path, overrides: list[str] | None) -> str:
    import yaml

    from .load import load_recipe

    data = load_recipe(recipe, overrides or ()).model_dump(mode="json")
    return yaml.safe_dump(data, sort_keys=False)


@app.command()
def schema(
    out_path: Annotated[
        Path | None, typer.Option("--out", help="where to write (default: schema/recipe.schema.json)")
    ] = None,
    check: Annotated[bool, typer.Option("--check", help="exit 1 if the file on disk is stale")] = False,
) -> None:
    """Write the recipe's JSON Schema for editor autocompletion."""
    from .schema.jsonschema import SCHEMA_PATH, render

    target = out_path or SCHEMA_PATH
    text = render()
    if check:
        if not target.is_file() or target.read_text(encoding="utf-8") != text:
            err.print(f"{target} is stale: run `engine schema`", markup=False)
            raise typer.Exit(1)
        out.print(f"{target} is up to date", markup=False)
        return
    target.write_text(text, encoding="utf-8")
    out.print(f"wrote {target}", markup=False)


@app.command()
def plugins() -> None:
    """List the installed data-source and reward plugins."""
    from . import plugin

    try:
        sources, rewards = plugin.data_sources(), plugin.rewards()
    except EngineError as exc:
        raise fail(exc) from None
    table = Table("kind", "name", "records / params", "description", box=None)
    for name, source in sorted(sources.items()):
        table.add_row("data source", name, ", ".join(sorted(source.kinds)), source.description)
    for name, reward in sorted(rewards.items()):
        table.add_row("reward", name, ", ".join(reward.params.model_fields), reward.description)
    out.print(table)


@app.command("export")
def export_(
    artifact: Annotated[
        Path, typer.Argument(help="a stage's folder (runs/<run>/<stage>), its checkpoints/, or one checkpoint folder")
    ],
    out_dir: Annotated[Path, typer.Option("--out", help="the folder to write (new or empty)")],
    fmt: Annotated[str, typer.Option("--format", help="hf: a folder for transformers")] = "hf",
    dtype: Annotated[str, typer.Option("--dtype", help="fp32 or bf16 weights")] = "fp32",
    tokenizer: Annotated[
        Path | None, typer.Option("--tokenizer", help="the run's tokenizer.json, when meta.json's path is elsewhere")
    ] = None,
    family: Annotated[
        str | None,
        typer.Option("--family", help="llama, qwen2, qwen3 or mistral (default: the one the architecture fits)"),
    ] = None,
) -> None:
    """Export a stage's newest checkpoint as a Hugging Face causal LM (Llama, Qwen2, Qwen3 or Mistral) with its tokenizer."""
    problems = [f"--format {fmt!r}: only 'hf' is supported"] if fmt != "hf" else []
    problems += [f"--dtype {dtype!r}: use fp32 or bf16"] if dtype not in ("fp32", "bf16") else []
    if problems:
        raise fail(EngineError("; ".join(problems)))
    from .hf.to_hf import export_checkpoint

    try:
        ckpt, hf_class = export_checkpoint(artifact, out_dir, dtype=dtype, tokenizer=tokenizer, family=family)
    except EngineError as exc:
        raise fail(exc) from None
    out.print(f"exported {ckpt} to {out_dir} ({hf_class}, {dtype})", markup=False)


@app.command("import")
def import_(
    hf_dir: Annotated[
        Path, typer.Argument(help="a local HF Llama/Qwen2/Qwen3/Mistral folder (config.json, safetensors, tokenizer.json)")
    ],
    out_dir: Annotated[Path, typer.Option("--out", help="the checkpoint folder to write (new or empty)")],
    seq_length: Annotated[
        int | None,
        typer.Option("--seq-length", min=1, max=10_000_000,
                     help="the recipe's model.seq_length (default: max_position_embeddings)"),
    ] = None,
    divisor: Annotated[
        int | None,
        typer.Option(
            "--make-vocab-size-divisible-by",
            min=1,
            max=65536,
            help="vocabulary padding (default: what fits the embedding)",
        ),
    ] = None,
    recipe: Annotated[
        Path | None, typer.Option("--recipe", help="also write the fine-tuning recipe to this new file")
    ] = None,
    cluster: Annotated[
        str, typer.Option("--cluster", help="the recipe's cluster profile: its layouts (local, h100, a profile YAML)")
    ] = "local",
) -> None:
    """Import a Hugging Face checkpoint (Llama 3/3.1/3.2, Qwen2/2.5, Qwen3, Mistral) as an engine checkpoint, and
    print a fine-tuning recipe (data → SFT → reward model → PPO) that starts from it."""
    from .compile.resolve import resolve_cluster
    from .hf.from_hf import import_checkpoint
    from .hf.recipe import finetune_recipe, recipe_name, render_recipe, write_recipe

    profile, problems = resolve_cluster(cluster)
    if profile is None:
        raise fail(EngineError("--cluster: " + "; ".join(f"{p.message} ({p.fix})" for p in problems)))
    if recipe is not None and recipe.exists():
        raise fail(EngineError(f"--recipe {recipe} exists; choose a new file (a recipe you wrote is never overwritten)"))
    try:
        done = import_checkpoint(hf_dir, out_dir, seq_length=seq_length, vocab_divisor=divisor)
        body, note = finetune_recipe(
            done.section, out_dir, rows=done.rows, name=recipe_name(hf_dir), cluster=cluster,
            gpu=profile.device == "cuda", family=done.family,
        )  # fmt: skip
        text = render_recipe(body, note)
        if recipe is not None:
            write_recipe(recipe, text)
    except EngineError as exc:
        raise fail(exc) from None
    where = f"; written to {recipe}" if recipe is not None else ""
    # One line, then YAML to paste: written directly, never wrapped by the console.
    sys.stdout.write(f"# imported {hf_dir} into {out_dir}; a fine-tuning recipe that starts from it{where}:\n{text}")


@app.command()
def chat(
    target: Annotated[
        Path, typer.Argument(help="a run directory (runs/<name>), a stage's folder, or one checkpoint folder")
    ],
    prompt: Annotated[
        str | None, typer.Option("--prompt", help="answer this one message, print only the reply, and exit")
    ] = None,
    system: Annotated[str | None, typer.Option("--system", help="a system message before the conversation")] = None,
    temperature: Annotated[float, typer.Option("--temperature", min=0.0, max=100.0, callback=finite, help="0: greedy")] = 0.7,
    top_k: Annotated[int, typer.Option("--top-k", min=0, help="sample from the k likeliest tokens (0: all)")] = 0,
    top_p: Annotated[float, typer.Option("--top-p", min=0.0, max=1.0, callback=finite, help="nucleus sampling mass (1: all)")] = 1.0,
    max_new_tokens: Annotated[
        int | None, typer.Option("--max-new-tokens", min=1, help="reply length limit (default: half the context)")
    ] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="seed the sampler: the same replies every time")] = None,
    tokenizer: Annotated[
        Path | None, typer.Option("--tokenizer", help="the run's tokenizer.json, when meta.json's path is elsewhere")
    ] = None,
) -> None:
    """Chat with a trained model (the newest policy of a run): multi-turn in the terminal, or one --prompt."""

    def note(text: str) -> None:
        err.print(text, markup=False, style="dim")

    try:
        from .chat_session import Options, interactive, locate, open_chat, reader, say

        options = Options(temperature, top_k, top_p, max_new_tokens, seed, system)
        found = locate(target, tokenizer)
        if prompt is None:
            note(f"loading {found.checkpoint}")
        with open_chat(found, options, note) as session:
            if prompt is not None:
                say(session.reply(prompt))
                return
            note("/reset clears the conversation, /exit or Ctrl-D leaves")
            interactive(session, reader(err), say, note)
    except EngineError as exc:
        raise fail(exc) from None
    except KeyboardInterrupt:
        raise typer.Exit(130) from None


@app.command()
def report(
    run_dir: RunArg,
    out_file: Annotated[
        Path | None, typer.Option("--out", help="the HTML file to write (default: RUN_DIR/report.html)")
    ] = None,
) -> None:
    """Write one self-contained HTML page for a run: the plan, held-out metrics and training curves."""
    from .report import write_report

    try:
        path = write_report(run_dir, out_file)
    except EngineError as exc:
        raise fail(exc) from None
    sys.stdout.write(f"{path}\n")  # the path alone, never wrapped: `xdg-open "$(engine report runs/tiny)"`


def main() -> None:
    app()


if __name__ == "__main__":
    main()
