"""Deduplication across all sources, and decontamination against held-out evaluation prompts.

* Exact: SHA-256 of the normalised text (case-folded, whitespace collapsed); a repeat is dropped.
* Near: MinHash signatures of word-shingle sets (Broder 1997) indexed by LSH bands (datasketch); a
  document that shares an LSH band with any earlier document (one whose estimated Jaccard similarity
  exceeds the threshold, kept or itself dropped as a near-duplicate) is dropped. Comparing with every
  earlier document rather than the kept ones only makes the decision one per band bucket (all but the
  bucket's earliest member go), which is what lets a sharded stage decide it partition by partition
  with the same result. Memory grows with the documents' signatures (num_perm integers each), not text.

A document's `Signature` (its digest and MinHash values) depends on its text alone, so worker processes
compute them; only the look-up in the index of kept documents (`keep_signature`), which depends on every
earlier document, runs in one place, in document order.
* Decontamination: a training document that shares any word n-gram (13 by default, as GPT-3's
  contamination analysis) with an evaluation prompt is dropped.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from ..schema import DedupSpec


def canonical(text: str) -> str:
    return " ".join(text.casefold().split())


def shingles(text: str, n: int) -> set[str]:
    words = canonical(text).split()
    if len(words) < n:
        return {" ".join(words)} if words else set()
    return {" ".join(words[i : i + n]) for i in range(len(words) - n + 1)}


@dataclass(frozen=True)
class Signature:
    """What deduplication and the split need of a document: the SHA-256 of its normalised text and, with
    near dedup, its MinHash values."""

    digest: bytes
    minhash: Any = None  # numpy uint64 [num_perm], or None


def signature(text: str, spec: DedupSpec) -> Signature:
    """A document's signature (a pure function of the text: worker processes compute it)."""
    digest = hashlib.sha256(canonical(text).encode()).digest()
    if not spec.near:
        return Signature(digest)
    from datasketch import MinHash

    mh = MinHash(num_perm=spec.num_perm, seed=1)
    mh.update_batch([s.encode() for s in shingles(text, spec.shingle_size)])
    return Signature(digest, mh.hashvalues)


@dataclass
class Deduplicator:
    spec: DedupSpec
    report: Counter[str] = field(default_factory=Counter)

    def __post_init__(self) -> None:
        self._hashes: set[bytes] = set()
        self._lsh: Any = None
        self._template: Any = None
        self._count = 0
        if self.spec.near:
            from datasketch import MinHash, MinHashLSH

            self._lsh = MinHashLSH(threshold=self.spec.threshold, num_perm=self.spec.num_perm)
            self._template = MinHash(num_perm=self.spec.num_perm, seed=1)

    def keep(self, text: str) -> bool:
        """True for the first of its kind; records it so that later duplicates are dropped."""
        return self.keep_signature(signature(text, self.spec))

    def keep_signature(self, sig: Signature) -> bool:
        """`keep` for a document whose signature is computed: the look-ups, and the document recorded."""
        self.report["seen"] += 1
        if self.spec.exact:
            if sig.digest in self._hashes:
                self.report["exact_duplicates"] += 1
                return False
            self._hashes.add(sig.digest)
        if self._lsh is not None:
            from datasketch import MinHash

            t = self._template
            mh = MinHash(seed=1, hashvalues=sig.minhash, permutations=t.permutations, scheme=t.scheme)
            similar = bool(self._lsh.query(mh))
            self._lsh.insert(str(self._count), mh)  # every document: later ones are compared with all earlier ones
            self._count += 1
            if similar:
                self.report["near_duplicates"] += 1
                return False
        self.report["kept"] += 1
        return True


@dataclass
class Decontaminator:
    """Drops training text sharing a word n-gram with any held-out evaluation prompt."""

    n: int
    report: Counter[str] = field(default_factory=Counter)
    _grams: set[int] = field(default_factory=set)

    def add_eval(self, prompts: Iterable[str]) -> None:
        for prompt in prompts:
            self._grams.update(hash(g) for g in shingles(prompt, self.n) if len(g.split()) == self.n)

    def clean(self, text: str) -> bool:
        self.report["seen"] += 1
        if self._grams and any(hash(g) in self._grams for g in shingles(text, self.n)):
            self.report["contaminated"] += 1
            return False
        return True
