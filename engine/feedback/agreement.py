"""Inter-reviewer agreement on the items that two reviewers ranked.

For two rankings of the same K responses (`ranks[i]`: response i's place, 0 best), every pair of
responses is concordant (both reviewers order it the same way), discordant, or tied by one of them.

* pairwise agreement: concordant / (concordant + discordant), the fraction of response pairs on whose
  order both reviewers agree (0.5 is what two coin-flipping reviewers reach on average);
* Kendall's tau-b: (concordant − discordant) / sqrt((n0 − t1)(n0 − t2)), with n0 = K(K−1)/2 and t1, t2
  the pairs tied by each ranking (Kendall 1945), 1 for identical rankings, −1 for reversed ones.

Both are reported per pair of reviewers (summed over their shared items for the agreement, averaged
for tau) and over all pairs of reviewers together. No torch here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from itertools import combinations
from typing import Any


def pair_counts(a: Sequence[int], b: Sequence[int]) -> tuple[int, int, int, int]:
    """(concordant, discordant, tied in a, tied in b) over the response pairs of two rankings."""
    con = dis = tie_a = tie_b = 0
    for i, j in combinations(range(len(a)), 2):
        da, db = a[i] - a[j], b[i] - b[j]
        tie_a += da == 0
        tie_b += db == 0
        if da * db > 0:
            con += 1
        elif da * db < 0:
            dis += 1
    return con, dis, tie_a, tie_b


def kendall_tau_b(a: Sequence[int], b: Sequence[int]) -> float | None:
    """Kendall's tau-b of two rankings; None when either ranking ties everything."""
    con, dis, tie_a, tie_b = pair_counts(a, b)
    n0 = len(a) * (len(a) - 1) // 2
    denominator = math.sqrt((n0 - tie_a) * (n0 - tie_b))
    return None if denominator == 0 else (con - dis) / denominator


def agreement(judgments: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Agreement between reviewers over items ranked by two or more of them (rank judgments only)."""
    by_item: dict[int, list[dict[str, Any]]] = {}
    for j in judgments:
        if j["action"] == "rank" and j["ranks"]:
            by_item.setdefault(int(j["item_id"]), []).append(j)
    pairs: dict[tuple[str, str], dict[str, Any]] = {}
    for rankings in by_item.values():
        for x, y in combinations(sorted(rankings, key=lambda j: str(j["reviewer"])), 2):
            stats = pairs.setdefault((x["reviewer"], y["reviewer"]), {"items": 0, "con": 0, "dis": 0, "taus": []})
            con, dis, _, _ = pair_counts(x["ranks"], y["ranks"])
            tau = kendall_tau_b(x["ranks"], y["ranks"])
            stats["items"] += 1
            stats["con"] += con
            stats["dis"] += dis
            stats["taus"] += [] if tau is None else [tau]
    rows = [_row(list(names), s) for names, s in sorted(pairs.items())]
    total = {"items": 0, "con": 0, "dis": 0, "taus": []}
    for s in pairs.values():
        for key in total:
            total[key] += s[key]
    return {"pairs": rows, "overall": _row([], total)}


def _row(reviewers: list[str], s: dict[str, Any]) -> dict[str, Any]:
    compared = s["con"] + s["dis"]
    return {
        "reviewers": reviewers,
        "items": s["items"],
        "response_pairs": compared,
        "pairwise_agreement": None if compared == 0 else s["con"] / compared,
        "kendall_tau": None if not s["taus"] else sum(s["taus"]) / len(s["taus"]),
    }
