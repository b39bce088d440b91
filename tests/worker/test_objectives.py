"""The shared training loop carries an objective with a frozen auxiliary model at every parallel layout: the
reference is built, loaded and kept frozen by the loop, its per-token outputs are computed through the
pipeline schedule and delivered from the last pipeline stage to every rank (tests/worker/objective_check.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from .helpers import HERE, make_plan

pytestmark = pytest.mark.slow

LAYOUTS = {
    "pp1": (1, []),
    "pp2": (2, ["stages.pretrain.parallelism.pp=2"]),
    "pp2vpp2": (2, ["stages.pretrain.parallelism.pp=2", "stages.pretrain.parallelism.vpp=2"]),
    "tp2": (2, ["stages.pretrain.parallelism.tp=2"]),
}


def _run(tmp: Path, name: str) -> list[dict[str, Any]]:
    nproc, layout = LAYOUTS[name]
    # No warmup: the first update already moves the policy away from the reference.
    overrides = (f"stages.pretrain.resources.gpus_per_node={nproc}", "stages.pretrain.training.warmup_steps=0")
    _, plan_path = make_plan(tmp / name, *overrides, *layout)
    out = tmp / name / "out"
    out.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           str(HERE / "objective_check.py"), str(plan_path), str(out)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(p.read_text()) for p in sorted(out.glob("rank*.json"))]


def _close(a: Any, b: Any, tol: float) -> bool:
    if isinstance(a, list):
        return len(a) == len(b) and all(_close(x, y, tol) for x, y in zip(a, b, strict=True))
    return bool(abs(a - b) <= tol * max(1.0, abs(b)))


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[str, Any]]]:
    tmp = tmp_path_factory.mktemp("objective")
    return {name: _run(tmp, name) for name in LAYOUTS}


def test_the_loop_loads_the_reference_and_keeps_it_frozen(results: dict[str, list[dict[str, Any]]]) -> None:
    for name, ranks in results.items():
        for r in ranks:
            assert r["reference_is_initial_policy"], name  # loaded from the checkpoint of the initial weights
            assert r["reference_frozen"] and r["reference_unchanged"], name
            assert r["policy_changed"], name  # the trained model moved, the reference did not


def test_reference_outputs_reach_the_loss_aligned_with_their_micro_batches(
    results: dict[str, list[dict[str, Any]]],
) -> None:
    (base,) = results["pp1"]
    first = base["steps"][0]
    # Before the first update the policy is the reference: −Σ log π_ref(label) is the policy's own NLL sum.
    assert first["ref_logp_sum"] == pytest.approx(-first["nll_sum"], rel=1e-5)
    per_batch = [sum(sum(row) for row in mb) for mb in base["delivered"]]
    assert first["ref_logp_sum"] == pytest.approx(sum(per_batch) / len(per_batch), rel=1e-5)
    assert base["steps"][1]["ref_logp_sum"] != pytest.approx(-base["steps"][1]["nll_sum"], rel=1e-6)


@pytest.mark.parametrize("layout", ["pp2", "pp2vpp2", "tp2"])
def test_every_rank_gets_the_last_stage_outputs_of_pp1(results: dict[str, list[dict[str, Any]]], layout: str) -> None:
    (base,) = results["pp1"]
    assert len(results[layout]) == 2
    for r in results[layout]:
        assert _close(r["delivered"], base["delivered"], 1e-5)  # per-token log-probabilities, every rank
        for got, want in zip(r["steps"], base["steps"], strict=True):
            assert _close([got[k] for k in sorted(want)], [want[k] for k in sorted(want)], 1e-4), (got, want)
        assert _close([r["valid"][k] for k in sorted(base["valid"])], [base["valid"][k] for k in sorted(base["valid"])],
                      1e-4)  # fmt: skip
