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
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import accumulate

from ..schema import CleaningSpec

# Runs of spaces, tabs and no-break spaces become one space: only runs of two or more and lone tabs or
# no-break spaces change, so those are all the pattern matches (a line without any is left as it is).
_SPACES = re.compile(r"[ \t\u00a0]{2,}|[\t\u00a0]")
_BLANKS = re.compile(r"\n{3,}")


def normalize(text: str, *, form: str, whitespace: bool) -> str:
    if form != "none":
        text = unicodedata.normalize(form, text)  # type: ignore[arg-type]
    if whitespace:
        text = "\n".join(_spaces(line).strip() for line in text.splitlines())
        text = _BLANKS.sub("\n\n", text).strip()
    return text


def _spaces(line: str) -> str:
    if "  " in line or "\t" in line or "\xa0" in line:
        return _SPACES.sub(" ", line)
    return line


def duplicate_line_fraction(text: str) -> float:
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        return 0.0
    return 1.0 - len(set(lines)) / len(lines)


def _words(text: str) -> tuple[list[str], int]:
    """The words of a text and their total characters."""
    words = text.split()
    return words, sum(map(len, words))


def _grams(words: list[str], n: int) -> Iterator[tuple[str, ...]]:
    return zip(*(words[i:] for i in range(n)), strict=False)  # the shifted copies end early: n-grams that fit


def top_ngram_fraction(text: str, n: int = 2) -> float:
    """Characters covered by the most frequent word n-gram, over all word characters."""
    return _top_ngram_fraction(*_words(text), n)


def _top_ngram_fraction(words: list[str], total: int, n: int) -> float:
    if len(words) < n or total == 0:
        return 0.0
    gram, count = Counter(_grams(words, n)).most_common(1)[0]  # among ties, the first to occur
    if count < 2:
        return 0.0
    return min(1.0, count * sum(len(w) for w in gram) / total)


def duplicate_ngram_fraction(text: str, n: int = 5) -> float:
    """Characters of words inside word n-grams that occur more than once, over all word characters."""
    return _duplicate_ngram_fraction(*_words(text), n)


def _duplicate_ngram_fraction(words: list[str], total: int, n: int) -> float:
    if len(words) < n or total == 0:
        return 0.0
    grams = list(_grams(words, n))
    counts = Counter(grams)
    if len(counts) == len(grams):
        return 0.0
    # The words covered form runs [start, end): each repeated n-gram at i extends or starts one.
    chars = list(accumulate(map(len, words), initial=0))
    covered, start, end = 0, 0, 0
    for i, gram in enumerate(grams):
        if counts[gram] > 1:
            if i > end:
                covered += chars[end] - chars[start]
                start = i
            end = i + n
    return (covered + chars[end] - chars[start]) / total


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
        if s.max_top_ngram_fraction is not None or s.max_duplicate_ngram_fraction is not None:
            words, total = _words(text)  # split once for both n-gram rules
            if s.max_top_ngram_fraction is not None and _top_ngram_fraction(words, total, 2) > s.max_top_ngram_fraction:
                return "top_ngram"
            if (
                s.max_duplicate_ngram_fraction is not None
                and _duplicate_ngram_fraction(words, total, 5) > s.max_duplicate_ngram_fraction
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
