"""Cleaning filters, exact and near-duplicate removal, decontamination."""

from __future__ import annotations

import random

from engine.corpus.clean import (
    Cleaner,
    duplicate_line_fraction,
    duplicate_ngram_fraction,
    normalize,
    top_ngram_fraction,
)
from engine.corpus.dedup import Decontaminator, Deduplicator
from engine.schema import CleaningSpec, DedupSpec

WORDS = [
    "alpha",
    "beta",
    "gamma",
    "delta",
    "epsilon",
    "zeta",
    "eta",
    "theta",
    "iota",
    "kappa",
    "lambda",
    "mu",
    "nu",
    "xi",
    "omicron",
    "pi",
    "rho",
    "sigma",
    "tau",
]


def prose(seed: int, n: int = 80) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) + str(rng.randint(0, 999)) for _ in range(n))


def test_normalize_unicode_and_whitespace() -> None:
    assert normalize("ﬁne\u00a0 \t text  \n\n\n\n next ", form="NFKC", whitespace=True) == "fine text\n\nnext"
    assert normalize("ﬁ", form="none", whitespace=False) == "ﬁ"


def test_repetition_measures() -> None:
    assert duplicate_line_fraction("a\nb\na\na") == 0.5
    assert duplicate_line_fraction("a\nb\nc") == 0.0
    assert top_ngram_fraction("buy now " * 20) > 0.9
    assert top_ngram_fraction(prose(1)) < 0.1
    assert duplicate_ngram_fraction("one two three four five " * 4) == 1.0
    assert duplicate_ngram_fraction(prose(2)) == 0.0


def test_each_filter_counts_what_it_removes() -> None:
    cleaner = Cleaner(CleaningSpec(min_chars=10, max_chars=5000, blocklist=[r"(?i)lorem ipsum"]))
    docs = {
        "short": "tiny",
        "long": prose(3, 2000),
        "lines": "same line here\n" * 10 + "other",
        "spam": "click here " * 50,
        "blocked": prose(4) + " Lorem Ipsum",
        "good": prose(5),
    }
    kept = {name: cleaner.clean(text) for name, text in docs.items()}
    assert [n for n, t in kept.items() if t is not None] == ["good"]
    assert cleaner.report == {
        "seen": 6, "kept": 1, "length": 2, "duplicate_lines": 1, "top_ngram": 1, "blocklist": 1,
    }  # fmt: skip


def test_disabled_filters_keep_everything_long_enough() -> None:
    spec = CleaningSpec(
        max_duplicate_line_fraction=None, max_top_ngram_fraction=None, max_duplicate_ngram_fraction=None
    )
    cleaner = Cleaner(spec)
    assert cleaner.clean("click here " * 50) == ("click here " * 50).strip()


def test_exact_and_near_duplicates_are_found_and_distinct_documents_survive() -> None:
    dedup = Deduplicator(DedupSpec(threshold=0.7))
    originals = [prose(100 + i) for i in range(30)]
    planted_exact = [originals[3].upper(), "  " + originals[7].replace(" ", "   ")]
    near = []
    for i in (1, 5, 9):  # one word of 80 changed: Jaccard similarity of 5-word shingles ≈ 0.88
        words = originals[i].split()
        words[40] = "changed"
        near.append(" ".join(words))
    kept = [d for d in originals + planted_exact + near if dedup.keep(d)]
    assert kept == originals
    assert dedup.report["exact_duplicates"] == 2 and dedup.report["near_duplicates"] == 3


def test_exact_only_keeps_near_duplicates() -> None:
    dedup = Deduplicator(DedupSpec(near=False))
    words = prose(7).split()
    other = " ".join(["x", *words[1:]])
    assert dedup.keep(prose(7)) and dedup.keep(other) and not dedup.keep(prose(7))


def test_decontamination_drops_text_sharing_an_eval_ngram() -> None:
    deco = Decontaminator(n=5)
    deco.add_eval(["what is the sum of twelve and seven"])
    assert not deco.clean("Question: What is the sum of twelve and seven? Answer 19")
    assert deco.clean("what is the product of twelve and seven")
    assert deco.report == {"seen": 2, "contaminated": 1}
