"""From documents to training batches.

    corpus  = tokenize_documents(texts, tokenizer)      # all tokens in one array + document offsets
    rows    = PackedRows(corpus, seq_len, eos_id)       # or PaddedRows(corpus, seq_len, tokenizer)
    batches = BatchIterator(rows, batch_size, seed)     # deterministic order; state = (epoch, index)

`packed` joins documents with eos and cuts the stream into full rows: no position is padding.
`padded` is MiniMind's layout: one document per row, bos + text + eos, truncated, padded, labels -100 on padding.
Labels are aligned with input_ids; the model shifts them.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from minipretrain.errors import DataError

IGNORE = -100


@dataclass
class TokenizedCorpus:
    tokens: np.ndarray  # every document's tokens back to back, no separators
    offsets: np.ndarray  # int64, document i is tokens[offsets[i]:offsets[i + 1]]
    doc_bytes: np.ndarray  # UTF-8 bytes of each source document (for bits per byte)

    @property
    def num_bytes(self) -> int:
        return int(self.doc_bytes.sum())

    @property
    def num_documents(self) -> int:
        return len(self.offsets) - 1

    def document(self, i: int) -> np.ndarray:
        return self.tokens[self.offsets[i] : self.offsets[i + 1]]


def tokenize_documents(texts: Iterable[str], tokenizer, chunk: int = 512, show_progress: bool = True,
                       desc: str = "tokenize") -> TokenizedCorpus:
    """Encode documents in batches (the Rust tokenizer runs a batch on all cores)."""
    dtype = np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.int32
    pieces, lengths, doc_bytes, buffer = [], [], [], []
    bar = tqdm(desc=desc, unit=" docs", disable=not show_progress, leave=False)

    def flush():
        for ids in tokenizer.encode_batch(buffer):
            pieces.append(np.asarray(ids, dtype=dtype))
            lengths.append(len(ids))
        bar.update(len(buffer))
        buffer.clear()

    for text in texts:
        buffer.append(text)
        doc_bytes.append(len(text.encode("utf-8")))
        if len(buffer) >= chunk:
            flush()
    if buffer:
        flush()
    bar.close()
    tokens = np.concatenate(pieces) if pieces else np.zeros(0, dtype=dtype)
    offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).astype(np.int64)
    return TokenizedCorpus(tokens, offsets, np.asarray(doc_bytes, dtype=np.int64))


def split_documents(texts: list[str], fraction: float) -> tuple[list[str], list[str]]:
    """Hold out a fixed, seed-independent set of documents (at least one), so every run validates on the same text."""
    n = len(texts)
    n_val = max(1, round(n * fraction))
    if n_val >= n:
        raise DataError(f"only {n} document(s): too few to hold out data.val_fraction={fraction} for validation; "
                        "add data, set data.val_path, or set data.val_fraction=0")
    held_out = np.zeros(n, dtype=bool)
    held_out[np.random.default_rng(0).permutation(n)[:n_val]] = True
    return [t for t, h in zip(texts, held_out) if not h], [t for t, h in zip(texts, held_out) if h]


def _to_batch(rows: list[np.ndarray], seq_len: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, labels) of shape (len(rows), seq_len): short rows padded with pad_id, their labels -100."""
    inputs = np.full((len(rows), seq_len), pad_id, dtype=np.int64)
    labels = np.full((len(rows), seq_len), IGNORE, dtype=np.int64)
    for r, row in enumerate(rows):
        inputs[r, : len(row)] = row
        labels[r, : len(row)] = row
    return torch.from_numpy(inputs), torch.from_numpy(labels)


class PackedRows:
    """The stream doc0 eos doc1 eos ... cut into rows of seq_len tokens. Training drops the final partial row;
    evaluation keeps it (padded, labels -100) so every token is scored."""

    def __init__(self, corpus: TokenizedCorpus, seq_len: int, eos_id: int, pad_id: int = 0, keep_partial: bool = False):
        stream = np.empty(len(corpus.tokens) + corpus.num_documents, dtype=np.int64)
        ends = corpus.offsets[1:] + np.arange(1, corpus.num_documents + 1)  # position after each doc's eos
        is_eos = np.zeros(len(stream), dtype=bool)
        is_eos[ends - 1] = True
        stream[is_eos] = eos_id
        stream[~is_eos] = corpus.tokens
        self.stream, self.seq_len, self.pad_id = stream, seq_len, pad_id
        self.num_rows = len(stream) // seq_len + (1 if keep_partial and len(stream) % seq_len else 0)

    def __len__(self):
        return self.num_rows

    def row(self, i: int) -> np.ndarray:
        return self.stream[i * self.seq_len : (i + 1) * self.seq_len]

    def get(self, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        return _to_batch([self.row(i) for i in indices], self.seq_len, self.pad_id)


class PaddedRows:
    """MiniMind's layout: row i is bos + document i + eos, truncated to seq_len, then padded."""

    def __init__(self, corpus: TokenizedCorpus, seq_len: int, bos_id: int, eos_id: int, pad_id: int = 0):
        self.corpus, self.seq_len = corpus, seq_len
        self.bos_id, self.eos_id, self.pad_id = bos_id, eos_id, pad_id
        self.num_rows = corpus.num_documents

    def __len__(self):
        return self.num_rows

    def row(self, i: int) -> np.ndarray:
        return np.concatenate([[self.bos_id], self.corpus.document(i), [self.eos_id]])[: self.seq_len]

    def get(self, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        return _to_batch([self.row(i) for i in indices], self.seq_len, self.pad_id)


class BatchIterator:
    """Endless, deterministic batches. Epoch e visits the rows in permutation (seed, e); the whole position is
    (epoch, index), so resuming is O(1) and reads nothing it skips."""

    def __init__(self, rows, batch_size: int, seed: int, shuffle: bool = True):
        if len(rows) == 0:
            raise DataError("no rows to batch")
        self.rows, self.batch_size, self.seed, self.shuffle = rows, batch_size, seed, shuffle
        self.epoch, self.index = 0, 0
        self._order_epoch, self._order = -1, None

    def _epoch_order(self) -> np.ndarray:
        if self._order_epoch != self.epoch:
            n = len(self.rows)
            self._order = np.random.default_rng([self.seed, self.epoch]).permutation(n) if self.shuffle else np.arange(n)
            self._order_epoch = self.epoch
        return self._order

    def next_indices(self) -> np.ndarray:
        out = []
        while len(out) < self.batch_size:
            order = self._epoch_order()
            take = order[self.index : self.index + self.batch_size - len(out)]
            out.extend(take.tolist())
            self.index += len(take)
            if self.index >= len(order):
                self.epoch, self.index = self.epoch + 1, 0
        return np.asarray(out, dtype=np.int64)

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.rows.get(self.next_indices())

    def __iter__(self):
        return self

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed, "num_rows": len(self.rows)}

    def load_state_dict(self, state: dict) -> None:
        if state["num_rows"] != len(self.rows) or state["seed"] != self.seed:
            raise DataError(
                f"the training data changed since the checkpoint ({state['num_rows']} rows with seed {state['seed']} "
                f"then, {len(self.rows)} rows with seed {self.seed} now): resume with the same data and train.seed"
            )
        self.epoch, self.index = state["epoch"], state["index"]


def make_rows(corpus: TokenizedCorpus, layout: str, seq_len: int, tokenizer, for_eval: bool = False):
    if layout == "padded":
        return PaddedRows(corpus, seq_len, tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id)
    return PackedRows(corpus, seq_len, tokenizer.eos_id, tokenizer.pad_id, keep_partial=for_eval)
