"""The per-stage layout, estimated memory per GPU and throughput of every shipped H100 recipe, as the
markdown tables of docs/h100_recipes.md, from the golden plans (tests/golden/*.plan.json, which the plan
tests keep equal to what `engine plan` compiles).

    .venv/bin/python scripts/h100_tables.py > tables.md
"""

from __future__ import annotations

import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GIB = 2**30
PARTS = ("weights", "gradients", "optimizer", "activations", "frozen_models", "kv_cache")


def tables() -> str:
    out = []
    for recipe in sorted((REPO / "recipes" / "h100").glob("*.yaml")):
        plan = json.loads((REPO / "tests" / "golden" / f"{recipe.stem}.plan.json").read_text())
        out += [f"### `recipes/h100/{recipe.name}`", "",
                "| stage | kind | nodes × GPUs | tp/pp/cp/dp/vpp | memory per GPU | of it: weights + gradients + "
                "optimizer + activations + frozen models + KV cache | est. tokens/s | steps | est. wall |",
                "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
        for job in plan["jobs"]:
            est, lay, res = job.get("estimate"), job.get("layout"), job["resources"]
            if est is None or lay is None:
                continue
            mem = est["memory"]
            wall = est["wall_time_s"]
            when = f"{wall / 86400:.1f} d" if wall > 2 * 86400 else f"{wall / 3600:.1f} h"
            out.append(
                f"| {job['name']} | {job['kind']} | {res['nodes']}×{res['gpus_per_node']} | {lay['tp']}/{lay['pp']}/"
                f"{lay['cp']}/{lay['dp']}/{lay['vpp']} | {mem['total'] / GIB:.1f} GiB | "
                + " + ".join(f"{mem[k] / GIB:.1f}" for k in PARTS)
                + f" | {est['tokens_per_s']:,.0f} | {est['steps']:,} | {when} |"
            )
        phased = [j for j in plan["jobs"] if (j.get("estimate") or {}).get("memory", {}).get("phases")]
        for job in phased:
            phases = job["estimate"]["memory"]["phases"]
            offload = job["config"].get("offload") or []
            out += ["", f"{job['name']} memory per GPU by phase (the roles take turns; the table's figure is the largest): "
                    + " · ".join(f"{k} {v / GIB:.1f} GiB" for k, v in phases.items())
                    + (f"; offloaded to host memory outside their phases: {', '.join(offload)}" if offload else
                       "; nothing offloaded")]  # fmt: skip
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    print(tables(), end="")
