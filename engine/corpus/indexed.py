"""Megatron-Core's indexed dataset format (`<prefix>.bin` / `<prefix>.idx`), written without importing
Megatron-Core (whose import alone costs seconds in a data stage that never builds a model).

The .bin file is the token ids of every document, one after another. The .idx file is the 9-byte magic
`MMIDIDX\\x00\\x00`, the version (uint64 1), the dtype code (uint8), the sequence count and the document
count (uint64 each), then each sequence's length (int32), each sequence's byte offset in the .bin (int64)
and the document indices (int64: 0, then the sequence index after each document's last). One sequence
per document, as `IndexedDatasetBuilder.add_document(ids, [len(ids)])` records it; a test holds the
bytes equal to Megatron-Core's builder's.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

MAGIC = b"MMIDIDX\x00\x00"
DTYPE_CODES = {np.dtype(np.uint8): 1, np.dtype(np.int8): 2, np.dtype(np.int16): 3, np.dtype(np.int32): 4,
               np.dtype(np.int64): 5, np.dtype(np.float64): 6, np.dtype(np.float32): 7,
               np.dtype(np.uint16): 8}  # fmt: skip


def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest dtype Megatron's tools use for a vocabulary of this size."""
    return np.dtype(np.uint16 if vocab_size < 65_000 else np.int32)


class IndexWriter:
    """Appends documents (already flattened with their end-of-document token) to `<prefix>.bin`; `finalize`
    writes `<prefix>.idx`."""

    def __init__(self, prefix: str | Path, dtype: np.dtype) -> None:
        self.prefix, self.dtype = str(prefix), np.dtype(dtype)
        self._bin = open(self.prefix + ".bin", "wb")  # noqa: SIM115 (closed by finalize)
        self._lengths: list[np.ndarray] = []
        self.documents = self.tokens = 0

    def append(self, flat: np.ndarray, lengths: np.ndarray) -> None:
        """Documents whose tokens are `flat` (in order) and whose lengths are `lengths`."""
        if flat.dtype != self.dtype:
            raise ValueError(f"tokens of dtype {flat.dtype}, the dataset's is {self.dtype}")
        self._bin.write(flat.tobytes())
        self._lengths.append(np.asarray(lengths, dtype=np.int32))
        self.documents += len(lengths)
        self.tokens += int(flat.size)

    def finalize(self) -> None:
        self._bin.close()
        lengths = np.concatenate(self._lengths) if self._lengths else np.zeros(0, dtype=np.int32)
        pointers = np.zeros(len(lengths), dtype=np.int64)
        if len(lengths):
            pointers[1:] = np.cumsum(lengths[:-1].astype(np.int64)) * self.dtype.itemsize
        documents = np.arange(len(lengths) + 1, dtype=np.int64)
        with open(self.prefix + ".idx", "wb") as f:
            f.write(MAGIC)
            f.write(struct.pack("<Q", 1))
            f.write(struct.pack("<B", DTYPE_CODES[self.dtype]))
            f.write(struct.pack("<Q", len(lengths)))
            f.write(struct.pack("<Q", len(documents)))
            f.write(lengths.tobytes(order="C"))
            f.write(pointers.tobytes(order="C"))
            f.write(documents.tobytes(order="C"))


def read_lengths(idx_path: str | Path) -> np.ndarray:
    """The document lengths (int32) an .idx file written by IndexWriter records (one sequence per document)."""
    with open(idx_path, "rb") as f:
        head = f.read(len(MAGIC) + 8 + 1 + 16)
        if not head.startswith(MAGIC):
            raise ValueError(f"{idx_path} is not an indexed dataset index")
        count = struct.unpack("<Q", head[len(MAGIC) + 9 : len(MAGIC) + 17])[0]
        return np.frombuffer(f.read(4 * count), dtype=np.int32).copy()
