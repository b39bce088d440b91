"""Document cleaning: normalisation, then filters that each say why a document was dropped.

Normalisation: Unicode normal form (NFKC by default), then whitespace (runs of spaces and tabs become
one space, lines are stripped, runs of blank lines collapse). Filters, in order, after Rae et al. 2021
(Gopher, appendix A.1.1) where they are repetition rules:

* length: fewer than `min_chars` or more than `max_chars` characters;
* duplicate lines: the fraction of lines that repeat an earlier line exceeds the bound;
* top n-gram: the most frequent word 2-gram covers more than the bound of all word characters;
* duplicate n-grams: word 5-grams that occur more than once cover more than the bound of characters;
* blocklist: any of the recipe's regular expressions matches.

`Cleaner.clean(text)` returns the normalised text or None; `report` counts the removals per filter.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, field

from ..schema import CleaningSpec

_SPACES = re.compile(r"[ \t\u00a0]+")
_BLANKS = re.compile(r"\n{3,}")


def normalize(text: str, *, form: str, whitespace: bool) -> str:
    if form != "none":
        text = unicodedata.normalize(form, text)  # type: ignore[arg-type]
    if whitespace:
        text = "\n".join(_SPACES.sub(" ", line).strip() for line in text.splitlines())
        text = _BLANKS.sub("\n\n", text).strip()
    return text


def duplicate_line_fraction(text: str) -> float:
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        return 0.0
    return 1.0 - len(set(lines)) / len(lines)


def _ngrams(text: str, n: int) -> tuple[list[str], int, list[tuple[str, ...]]]:
    """Words, their total characters, and word n-grams."""
    words = text.split()
    return words, sum(len(w) for w in words), [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]


def top_ngram_fraction(text: str, n: int = 2) -> float:
    """Characters covered by the most frequent word n-gram, over all word characters."""
    _, total, grams = _ngrams(text, n)
    if not grams or total == 0:
        return 0.0
    gram, count = Counter(grams).most_common(1)[0]
    if count < 2:
        return 0.0
    return min(1.0, count * sum(len(w) for w in gram) / total)


def duplicate_ngram_fraction(text: str, n: int = 5) -> float:
    """Characters of words inside word n-grams that occur more than once, over all word characters."""
    words, total, grams = _ngrams(text, n)
    if not grams or total == 0:
        return 0.0
    counts = Counter(grams)
    covered = [False] * len(words)
    for i, gram in enumerate(grams):
        if counts[gram] > 1:
            for j in range(i, i + n):
                covered[j] = True
    return sum(len(w) for w, c in zip(words, covered, strict=True) if c) / total


@dataclass
class Cleaner:
    spec: CleaningSpec
    report: Counter[str] = field(default_factory=Counter)

    def __post_init__(self) -> None:
        self._blocklist = [re.compile(p) for p in self.spec.blocklist]

    def reason(self, text: str) -> str | None:
        """Why a normalised document is dropped, or None to keep it."""
        s = self.spec
        if len(text) < s.min_chars or (s.max_chars is not None and len(text) > s.max_chars):
            return "length"
        if s.max_duplicate_line_fraction is not None and duplicate_line_fraction(text) > s.max_duplicate_line_fraction:
            return "duplicate_lines"
        if s.max_top_ngram_fraction is not None and top_ngram_fraction(text) > s.max_top_ngram_fraction:
            return "top_ngram"
        if (
            s.max_duplicate_ngram_fraction is not None
            and duplicate_ngram_fraction(text) > s.max_duplicate_ngram_fraction
        ):
            return "duplicate_ngrams"
        if any(rx.search(text) for rx in self._blocklist):
            return "blocklist"
        return None

    def clean(self, text: str) -> str | None:
        self.report["seen"] += 1
        text = normalize(text, form=self.spec.unicode_normalization, whitespace=self.spec.normalize_whitespace)
        why = self.reason(text)
        if why is not None:
            self.report[why] += 1
            return None
        self.report["kept"] += 1
        return text
