"""Run in a fresh process (Megatron is patched for CPU there): per-parameter mean and std of Megatron-Core's
own initialisation and of the engine's layout-independent one, for the same config. Prints JSON.

    python tests/worker/init_check.py plan.json
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

from engine.worker.context import Context, init_distributed, job_spec, load_plan, shutdown
from engine.worker.env import RankInfo
from engine.worker.mcore import build_chunks, config_kwargs, init_layout_independent


def stats(model: object) -> dict[str, list[float]]:
    return {n: [float(p.detach().double().mean()), float(p.detach().double().std()), p.numel()]
            for n, p in model.named_parameters()}  # type: ignore[attr-defined]  # fmt: skip


def main() -> None:
    warnings.filterwarnings("ignore")
    from megatron.core.transformer.transformer_config import TransformerConfig

    plan = load_plan(Path(sys.argv[1]))
    job = plan.job("pretrain")
    training = job_spec(job).training
    init_distributed(Context(plan=plan, job=job, info=RankInfo(0, 1, 0, "127.0.0.1", 29561), device="cpu"),
                     seed=training.seed)  # fmt: skip
    try:
        config = TransformerConfig(**config_kwargs(job, plan.model, device="cpu", recompute="none"))
        (model,) = build_chunks(job, plan.model, config, device="cpu")  # Megatron-Core initialises it
        megatron = stats(model)
        init_layout_independent([model], seed=training.seed, std=plan.model.init_method_std,
                                num_layers=plan.model.num_layers)  # fmt: skip
        print(json.dumps({"megatron": megatron, "engine": stats(model)}))
    finally:
        shutdown()


if __name__ == "__main__":
    main()
