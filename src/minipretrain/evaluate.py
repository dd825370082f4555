"""Loss, perplexity and bits per byte of a model on tokenized rows.

Bits per byte divides the summed cross-entropy (in bits) by the UTF-8 bytes the predicted tokens spell, so it is
comparable across tokenizers. Special tokens (eos between documents) spell no bytes and are left out of it.
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm


def token_byte_lengths(tokenizer, vocab_size: int) -> torch.Tensor:
    """UTF-8 bytes spelled by each of the model's vocab_size ids (0 for specials and ids past the tokenizer's)."""
    lengths = tokenizer.token_bytes()
    return torch.tensor(lengths + [0] * (vocab_size - len(lengths)))


@torch.no_grad()
def evaluate(model, rows, batch_size: int, token_bytes: torch.Tensor, max_batches: int | None = None,
             device: str = "cpu", autocast=None, show_progress: bool = False) -> dict:
    was_training = model.training
    model.eval()
    token_bytes = token_bytes.to(device)
    n_batches = math.ceil(len(rows) / batch_size)
    if max_batches is not None:
        n_batches = min(n_batches, max_batches)
    nats = torch.zeros((), dtype=torch.float64, device=device)
    nats_with_bytes = torch.zeros((), dtype=torch.float64, device=device)
    targets_counted = 0
    bytes_counted = 0
    for b in tqdm(range(n_batches), desc="eval", disable=not show_progress, leave=False):
        indices = np.arange(b * batch_size, min((b + 1) * batch_size, len(rows)))
        batch = rows.get(indices).to(device)
        with autocast or nullcontext():
            logits = model(batch.inputs, doc_ids=batch.doc_ids).logits
        targets = F.pad(batch.labels[:, 1:], (0, 1), value=-100).flatten()
        valid = targets != -100
        losses = F.cross_entropy(logits.flatten(0, 1).float()[valid], targets[valid], reduction="none").double()
        nbytes = token_bytes[targets[valid]]
        nats += losses.sum()
        nats_with_bytes += losses[nbytes > 0].sum()
        targets_counted += int(valid.sum())
        bytes_counted += int(nbytes.sum())
    model.train(was_training)
    return _result(nats.item(), nats_with_bytes.item(), targets_counted, bytes_counted)


def _result(nats: float, nats_with_bytes: float, tokens: int, nbytes: int) -> dict:
    loss = nats / max(tokens, 1)
    return {
        "loss": loss,
        "perplexity": math.exp(min(loss, 700)),
        "bits_per_byte": nats_with_bytes / math.log(2) / max(nbytes, 1),
        "tokens": tokens,
        "bytes": nbytes,
        "nats": nats,
        "nats_with_bytes": nats_with_bytes,
    }


def combine_results(results: list[dict]) -> dict:
    """One result over several evaluations (e.g. per-source validation sets), weighted by tokens and bytes."""
    return _result(sum(r["nats"] for r in results), sum(r["nats_with_bytes"] for r in results),
                   sum(r["tokens"] for r in results), sum(r["bytes"] for r in results))
