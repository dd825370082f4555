"""From token streams to training batches.

    rows    = PackedRows(shards, seq_len, document_mask=True)   # or PaddedRows(shards, seq_len, bos_id)
    sampler = MixtureSampler([("en", rows_en), ("zh", rows_zh)], weights=[0.7, 0.3], seed=1337)
    batch   = sampler.next_batch(batch_size, rank=0, world=1)    # Batch(inputs, labels, doc_ids)
    sampler = MixtureSampler(..., objective=FillInTheMiddle(tokenizer))   # each row through an objective

`packed` cuts the stream doc0 eos doc1 eos ... into rows of seq_len: no position is padding. With document masking
each row also carries doc_ids, so attention stays inside a document and positions restart at each one; the label
of a document's first token is -100 (nothing before it in its own document predicts it).
`padded` is MiniMind's layout: one document per row, bos + text + eos, truncated, padded, labels -100 on padding.
Labels are aligned with input_ids; a causal model shifts them. An objective (objectives.py) transforms each
example before batching: the sampler keys it by (seed, source, draw), ObjectiveRows (evaluation) by row.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from minipretrain.data.objectives import IGNORE, CausalLM
from minipretrain.errors import DataError


class Batch(NamedTuple):
    inputs: torch.Tensor  # (batch, seq) token ids
    labels: torch.Tensor  # (batch, seq), -100 where no loss is wanted
    doc_ids: torch.Tensor | None = None  # (batch, seq) document index within each row, with document masking

    def to(self, device) -> Batch:
        return Batch(*(t.to(device, non_blocking=True) if t is not None else None for t in self))


def _to_batch(rows: list[tuple[np.ndarray, np.ndarray, np.ndarray | None]], seq_len: int, pad_id: int,
              padding_alone: bool = False) -> Batch:
    """Rows of (tokens, labels, doc_ids) into tensors of shape (len(rows), seq_len); short rows are padded with
    pad_id and labels -100. Padding is a document of its own, so no real token attends to it. padding_alone (for
    bidirectional attention, where earlier tokens would see it): a batch with padding gets doc_ids even when its
    rows have none."""
    inputs = np.full((len(rows), seq_len), pad_id, dtype=np.int64)
    labels = np.full((len(rows), seq_len), IGNORE, dtype=np.int64)
    padded = any(len(tokens) < seq_len for tokens, _, _ in rows)
    with_docs = rows[0][2] is not None or (padding_alone and padded)
    doc_ids = np.zeros((len(rows), seq_len), dtype=np.int64) if with_docs else None
    for r, (tokens, row_labels, row_docs) in enumerate(rows):
        inputs[r, : len(tokens)] = tokens
        labels[r, : len(tokens)] = row_labels
        if with_docs:
            if row_docs is not None:
                doc_ids[r, : len(tokens)] = row_docs
            doc_ids[r, len(tokens):] = doc_ids[r, len(tokens) - 1] + 1 if len(tokens) else 0
    return Batch(torch.from_numpy(inputs), torch.from_numpy(labels),
                 torch.from_numpy(doc_ids) if with_docs else None)


class _Rows:
    """What the sampler and evaluation need from a layout: len(), example(i) and get(indices)."""

    seq_len: int
    pad_id: int
    num_rows: int
    padding_alone = False  # see _to_batch

    def __len__(self):
        return self.num_rows

    def example(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        raise NotImplementedError

    def get(self, indices) -> Batch:
        return _to_batch([self.example(int(i)) for i in indices], self.seq_len, self.pad_id, self.padding_alone)


class PackedRows(_Rows):
    """Row i is tokens [i * seq_len, (i + 1) * seq_len) of the stream, read from the memory map. Training drops
    the final partial row; evaluation keeps it (padded, labels -100) so every token is scored."""

    def __init__(self, stream, seq_len: int, pad_id: int = 0, keep_partial: bool = False,
                 document_mask: bool = False):
        self.stream, self.seq_len, self.pad_id, self.document_mask = stream, seq_len, pad_id, document_mask
        n = stream.num_tokens
        self.num_rows = n // seq_len + (1 if keep_partial and n % seq_len else 0)

    def example(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        start = i * self.seq_len
        tokens = self.stream.read(start, start + self.seq_len)
        labels = tokens.copy()
        doc_ids = None
        if self.document_mask:
            begins = self.stream.document_starts(start + 1, start + len(tokens)) - start
            doc_ids = np.zeros(len(tokens), dtype=np.int64)
            doc_ids[begins] = 1
            doc_ids = np.cumsum(doc_ids)
            labels[begins] = IGNORE  # a document's first token has no context in its own document
        return tokens, labels, doc_ids


class PaddedRows(_Rows):
    """MiniMind's layout: row i is bos + document i + eos, truncated to seq_len, then padded."""

    def __init__(self, stream, seq_len: int, bos_id: int, pad_id: int = 0):
        self.stream, self.seq_len, self.bos_id, self.pad_id = stream, seq_len, bos_id, pad_id
        self.num_rows = stream.num_documents

    def example(self, i: int) -> tuple[np.ndarray, np.ndarray, None]:
        tokens = np.concatenate([[self.bos_id], self.stream.document(i)])[: self.seq_len]  # the stored doc ends in eos
        return tokens, tokens, None


def make_rows(stream, layout: str, seq_len: int, tokenizer, document_mask: bool = False, for_eval: bool = False):
    if layout == "padded":
        return PaddedRows(stream, seq_len, tokenizer.bos_id, tokenizer.pad_id)
    return PackedRows(stream, seq_len, tokenizer.pad_id, keep_partial=for_eval, document_mask=document_mask)


class ObjectiveRows(_Rows):
    """Evaluation rows under an objective (objectives.py): row i is transformed with key (seed, i)."""

    def __init__(self, rows: _Rows, objective, seed: int):
        self.rows, self.objective, self.seed = rows, objective, seed
        self.seq_len, self.pad_id, self.num_rows = rows.seq_len, rows.pad_id, len(rows)
        self.padding_alone = objective.bidirectional

    def example(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        return self.objective(self.rows.example(i), (self.seed, i))


class MixtureSampler:
    """Endless, deterministic batches from weighted sources. The whole position is a few integers: how many rows
    were drawn from each source. So resuming is O(1) and reads nothing it skips.

    Sample k of the global sequence comes from the source furthest behind its share (weight * (k + 1) - drawn is
    largest), so every prefix of the sequence matches the weights to within one row per source. A source's j-th
    row is its (j mod n)-th row in the permutation (seed, source, epoch = j div n): a source that runs out starts a
    new epoch with a new shuffle. The global sequence does not depend on how many data-parallel ranks consume it:
    each step, rank r of `world` takes its slice of the next world * batch_size samples. The objective transforms
    a source's j-th row with key (seed, source, j): a pure function of the position, so it resumes with it."""

    def __init__(self, sources: list[tuple[str, _Rows]], weights: list[float], seed: int,
                 fingerprints: list[str] | None = None, objective=None):
        if not sources:
            raise DataError("no data sources")
        for name, rows in sources:
            if len(rows) == 0:
                raise DataError(f"data source {name!r} has no rows")
        self.names = [name for name, _ in sources]
        self.rows = [rows for _, rows in sources]
        total = float(sum(weights))
        self.weights = np.asarray(weights, dtype=np.float64) / total
        self.seed = seed
        self.fingerprints = fingerprints or [""] * len(sources)  # identify each source's tokens, for resume
        self.drawn = [0] * len(sources)
        self.base = [0] * len(sources)  # draws carried over from a branched run: the weights apply after them
        self._orders: dict[int, tuple[int, np.ndarray]] = {}
        self.objective = objective or CausalLM()

    @property
    def consumed(self) -> int:
        return sum(self.drawn) - sum(self.base)

    def _row_of(self, source: int, j: int) -> int:
        n = len(self.rows[source])
        epoch = j // n
        cached = self._orders.get(source)
        if cached is None or cached[0] != epoch:
            order = np.random.default_rng([self.seed, source, epoch]).permutation(n)
            self._orders[source] = cached = (epoch, order)
        return int(cached[1][j % n])

    def next_samples(self, count: int) -> list[tuple[int, int, int]]:
        """The next `count` samples of the global sequence as (source, row, draw): the draw-th row of that source."""
        out = []
        for _ in range(count):
            behind = self.weights * (self.consumed + 1) - (np.asarray(self.drawn) - self.base)
            source = int(np.argmax(behind))
            draw = self.drawn[source]
            out.append((source, self._row_of(source, draw), draw))
            self.drawn[source] += 1
        return out

    def next_batch(self, batch_size: int, rank: int = 0, world: int = 1) -> Batch:
        samples = self.next_samples(batch_size * world)[rank * batch_size : (rank + 1) * batch_size]
        examples = [self.objective(self.rows[source].example(row), (self.seed, source, draw))
                    for source, row, draw in samples]
        return _to_batch(examples, self.rows[0].seq_len, self.rows[0].pad_id, self.objective.bidirectional)

    def tokens_by_source(self) -> dict[str, int]:
        """Row positions drawn from each source so far (all ranks together)."""
        return {name: n * rows.seq_len for name, n, rows in zip(self.names, self.drawn, self.rows, strict=True)}

    def state_dict(self) -> dict:
        return {"drawn": list(self.drawn), "base": list(self.base), "weights": self.weights.tolist(),
                "seed": self.seed, "names": list(self.names),
                "num_rows": [len(r) for r in self.rows], "fingerprints": list(self.fingerprints)}

    def load_state_dict(self, state: dict, carry_over: bool = False) -> list[str] | None:
        """Continue from a saved position. carry_over (a branched run, whose sources or weights may differ): the
        sources that are unchanged (same name, tokens, rows and seed) continue where they were, new ones start at
        their beginning, and the weights apply from here on; returns the names carried over (None: same data)."""
        now = self.state_dict()
        changed = [k for k in ("names", "num_rows", "seed", "fingerprints") if state.get(k) != now[k]]
        if carry_over and (changed or not np.allclose(state.get("weights", now["weights"]), now["weights"])):
            saved = {(name, rows, fp): drawn for name, rows, fp, drawn in
                     zip(state["names"], state["num_rows"], state["fingerprints"], state["drawn"], strict=True)}
            keys = zip(now["names"], now["num_rows"], now["fingerprints"], strict=True)
            self.drawn = [saved.get(key, 0) if state.get("seed") == self.seed else 0 for key in keys]
            self.base = list(self.drawn)
            return [name for name, drawn in zip(self.names, self.drawn, strict=True) if drawn]
        if changed:
            raise DataError(
                f"the training data changed since the checkpoint ({', '.join(changed)} differ: sources "
                f"{state.get('names')} with {state.get('num_rows')} rows, seed {state.get('seed')}, tokens "
                f"{state.get('fingerprints')} then; {now['names']} with {now['num_rows']} rows, seed {now['seed']}, "
                f"tokens {now['fingerprints']} now): resume with the same data, sources and train.seed")
        self.drawn = list(state["drawn"])
        self.base = list(state.get("base", [0] * len(self.drawn)))  # absent before branching existed
        return None
