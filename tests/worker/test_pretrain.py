"""The pretrain worker on CPU under torchrun/gloo: learning, parallel equivalence, exact resume after
SIGKILL (also during a checkpoint save), and resharding between layouts."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine.worker.checkpoint import complete_checkpoints, latest_checkpoint, read_meta

from .helpers import losses, make_plan, metrics, probe, torchrun

pytestmark = pytest.mark.slow


def _run(run_dir: Path, nproc: int, *overrides: str, fault: str | None = None, ok: bool = True) -> None:
    _, plan_path = make_plan(run_dir, f"stages.pretrain.resources.gpus_per_node={nproc}", *overrides)
    done = torchrun(plan_path, "pretrain", nproc, fault=fault)
    if ok:
        assert done.returncode == 0, done.stderr[-3000:]
    else:
        assert done.returncode != 0, "the injected fault did not stop the run"


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[int, float]:
    run_dir = tmp_path_factory.mktemp("ref")
    _run(run_dir, 1)
    return losses(run_dir)


def test_loss_falls(reference: dict[int, float], tmp_path_factory: pytest.TempPathFactory) -> None:
    assert sorted(reference) == list(range(1, 11))
    assert reference[10] < reference[1] - 0.8
    run = metrics(next(tmp_path_factory.getbasetemp().glob("ref*")))
    val = [m["val_loss"] for m in run if "val_loss" in m]
    assert len(val) == 2 and val[1] < val[0]


@pytest.mark.parametrize(
    ("nproc", "layout"),
    [
        (2, ["stages.pretrain.parallelism.tp=2"]),
        (2, ["stages.pretrain.parallelism.pp=2"]),
        (4, ["stages.pretrain.parallelism.tp=2", "stages.pretrain.parallelism.pp=2"]),
        (2, ["stages.pretrain.parallelism.pp=2", "stages.pretrain.parallelism.vpp=2"]),
        (2, []),
    ],
    ids=["tp2", "pp2", "tp2pp2", "pp2vpp2", "dp2"],
)
def test_parallel_layouts_reproduce_tp1_losses(
    reference: dict[int, float], tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, nproc: int,
    layout: list[str],
) -> None:  # fmt: skip
    """Losses and gradient norms: a data-parallel replica that skipped the gradient all-reduce would
    still report the averaged loss of step 1, but not the gradient norm of one model."""
    _run(tmp_path, nproc, *layout)
    got = losses(tmp_path)
    assert sorted(got) == sorted(reference)
    for step, loss in reference.items():
        assert got[step] == pytest.approx(loss, abs=1e-4), f"step {step}"
    norms = {m["step"]: m["grad_norm"] for m in metrics(tmp_path)}
    ref_norms = {m["step"]: m["grad_norm"] for m in metrics(next(tmp_path_factory.getbasetemp().glob("ref*")))}
    for step, norm in ref_norms.items():
        assert norms[step] == pytest.approx(norm, rel=1e-4), f"grad norm at step {step}"


def test_step_times_are_written_per_rank_and_leave_the_run_as_it_was(
    reference: dict[int, float], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ENGINE_STEP_TIMES: at DP2 each rank writes one line per step with its parts; the timed step computes
    what the untimed one does (the reference's losses, as the dp2 layout above)."""
    import json

    times = tmp_path / "steps"
    monkeypatch.setenv("ENGINE_STEP_TIMES", str(times))
    _run(tmp_path / "run", 2)
    got = losses(tmp_path / "run")
    for step, loss in reference.items():
        assert got[step] == pytest.approx(loss, abs=1e-4), f"step {step}"
    for rank in (0, 1):
        rows = [json.loads(x) for x in Path(f"{times}.{rank}").read_text().splitlines()]
        assert len(rows) == len(reference)
        assert all(set(r) == {"forward_backward_s", "grad_sync_s", "reduce_s", "optimizer_s"} for r in rows)
        assert all(r["forward_backward_s"] > 0 and r["grad_sync_s"] > 0 and r["optimizer_s"] > 0 for r in rows)


def test_sigkill_then_resume_reproduces_an_uninterrupted_run(tmp_path: Path) -> None:
    twenty = ["stages.pretrain.training.steps=20", "stages.pretrain.checkpointing.interval=10"]
    _run(tmp_path / "straight", 1, *twenty)
    _run(tmp_path / "killed", 1, *twenty, fault="after_step:15", ok=False)
    root = tmp_path / "killed" / "pretrain" / "checkpoints"
    assert [p.name for p in complete_checkpoints(root)] == ["step_00000010"]
    first_try = losses(tmp_path / "killed")
    assert max(first_try) == 15
    _run(tmp_path / "killed", 1, *twenty)
    straight, resumed = losses(tmp_path / "straight"), losses(tmp_path / "killed")
    assert sorted(resumed) == list(range(1, 21))
    for step in range(1, 21):
        assert resumed[step] == pytest.approx(straight[step], abs=1e-6), f"step {step}"
    for step in range(11, 16):  # the killed run's steps, computed again after the resume
        assert first_try[step] == pytest.approx(resumed[step], abs=1e-6)


def test_sigkill_during_a_save_leaves_the_previous_checkpoint(tmp_path: Path) -> None:
    twenty = ["stages.pretrain.training.steps=20", "stages.pretrain.checkpointing.interval=10"]
    _run(tmp_path, 1, *twenty, fault="in_save:20", ok=False)
    root = tmp_path / "pretrain" / "checkpoints"
    assert (root / ".tmp-step_00000020").is_dir()
    latest = latest_checkpoint(root)
    assert latest is not None and latest.name == "step_00000010"
    assert read_meta(latest)["step"] == 10
    _run(tmp_path, 1, *twenty)
    assert [p.name for p in complete_checkpoints(root)] == ["step_00000010", "step_00000020"]
    assert not any(p.name.startswith(".tmp-") for p in root.iterdir())
    assert (root / "latest").read_text().strip() == "step_00000020"


def test_keep_last_prunes_old_checkpoints(tmp_path: Path) -> None:
    _run(tmp_path, 1, "stages.pretrain.checkpointing.interval=2", "stages.pretrain.checkpointing.keep_last=2")
    root = tmp_path / "pretrain" / "checkpoints"
    assert [p.name for p in complete_checkpoints(root)] == ["step_00000008", "step_00000010"]
    meta = read_meta(root / "step_00000010")
    assert meta["layout"]["tp"] == 1 and meta["tokenizer"]["sha256"] == "synthetic"
    assert meta["architecture"]["num_layers"] == 4 and meta["kind"] == "pretrain"


def test_checkpoint_saved_at_tp2_pp2_loads_at_tp1_pp1(tmp_path: Path) -> None:
    tp2pp2 = ["stages.pretrain.parallelism.tp=2", "stages.pretrain.parallelism.pp=2"]
    _run(tmp_path, 4, *tp2pp2)
    _, plan_path = make_plan(tmp_path, "stages.pretrain.resources.gpus_per_node=4", *tp2pp2)
    assert probe(plan_path, 4, tmp_path / "wide.pt").returncode == 0
    _, plan_path = make_plan(tmp_path, "stages.pretrain.resources.gpus_per_node=1")
    done = probe(plan_path, 1, tmp_path / "narrow.pt")
    assert done.returncode == 0, done.stderr[-3000:]
    wide, narrow = torch.load(tmp_path / "wide.pt"), torch.load(tmp_path / "narrow.pt")
    assert torch.equal(wide["tokens"], narrow["tokens"])
    assert wide["logits"].shape == narrow["logits"].shape
    assert (wide["logits"] - narrow["logits"]).abs().max() <= 1e-5
    # Training continues at the new layout from the step it reached.
    _run(tmp_path, 1, "stages.pretrain.training.steps=12")
    assert sorted(losses(tmp_path)) == list(range(1, 13))


def test_engine_run_launches_pretraining_and_checks_its_inputs(tmp_path: Path) -> None:
    import subprocess
    import sys

    from .helpers import RECIPE, write_dataset

    engine = Path(sys.executable).with_name("engine")
    args = [str(engine), "run", str(RECIPE), f"run_dir={tmp_path}", "--stages", "pretrain"]
    missing = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert missing.returncode == 2 and "needs the dataset of stage 'data'" in missing.stderr
    assert "nothing was launched" in missing.stderr and not (tmp_path / "pretrain").exists()
    write_dataset(tmp_path / "data" / "data", {"a": 200, "b": 100})
    done = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "finished" in done.stdout and "pretrain/checkpoints" in done.stdout
    assert (tmp_path / "plan.json").is_file() and (tmp_path / "recipe.resolved.yaml").is_file()
    assert latest_checkpoint(tmp_path / "pretrain" / "checkpoints") is not None
    assert (tmp_path / "pretrain" / "logs" / "launch.log").is_file()
    assert any((tmp_path / "pretrain" / "tensorboard").iterdir())


ASYNC = "stages.pretrain.checkpointing.async_save=true"


def test_background_saves_match_synchronous_ones(tmp_path: Path) -> None:
    every5 = ["stages.pretrain.training.steps=20", "stages.pretrain.checkpointing.interval=5"]
    _run(tmp_path / "sync", 2, *every5)
    _run(tmp_path / "async", 2, *every5, ASYNC)
    assert losses(tmp_path / "async") == pytest.approx(losses(tmp_path / "sync"), abs=1e-6)
    root = tmp_path / "async" / "pretrain" / "checkpoints"
    assert [p.name for p in complete_checkpoints(root)] == ["step_00000015", "step_00000020"]  # keep_last: 2
    assert not any(p.name.startswith(".tmp-") for p in root.iterdir())
    assert (root / "latest").read_text().strip() == "step_00000020" and read_meta(root / "step_00000020")["step"] == 20
    _run(tmp_path / "async", 2, *every5[:1], "stages.pretrain.training.steps=22", *every5[1:], ASYNC)  # resumes from it
    assert sorted(losses(tmp_path / "async")) == list(range(1, 23))


def test_sigkill_during_a_background_save_resumes_as_if_uninterrupted(tmp_path: Path) -> None:
    twenty = ["stages.pretrain.training.steps=20", "stages.pretrain.checkpointing.interval=10", ASYNC]
    _run(tmp_path / "straight", 1, *twenty[:2])
    _run(tmp_path / "killed", 1, *twenty, fault="in_async_save:20", ok=False)
    root = tmp_path / "killed" / "pretrain" / "checkpoints"
    assert [p.name for p in complete_checkpoints(root)] == ["step_00000010"]
    assert (root / "latest").read_text().strip() == "step_00000010"
    _run(tmp_path / "killed", 1, *twenty)
    straight, resumed = losses(tmp_path / "straight"), losses(tmp_path / "killed")
    assert sorted(resumed) == list(range(1, 21))
    for step in range(1, 21):
        assert resumed[step] == pytest.approx(straight[step], abs=1e-6), f"step {step}"
    assert [p.name for p in complete_checkpoints(root)] == ["step_00000010", "step_00000020"]
    assert not any(p.name.startswith(".tmp-") for p in root.iterdir())
