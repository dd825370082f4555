"""Loss, perplexity, bits per byte and accuracy of a model on tokenized rows.

Bits per byte divides the summed cross-entropy (in bits) by the UTF-8 bytes the predicted tokens spell, so it is
comparable across tokenizers. Special tokens (eos between documents) spell no bytes and are left out of it.
Every number is over the positions with a label: all of them for causal LM, the chosen ones for masked LM, the
middles for fill-in-the-middle scoring (the rows' objective decides, see data/objectives.py).
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from minipretrain.model import prediction_targets
from minipretrain.parallel import World
from minipretrain.precision import exact_dtype


def token_byte_lengths(tokenizer, vocab_size: int) -> torch.Tensor:
    """UTF-8 bytes spelled by each of the model's vocab_size ids (0 for specials and ids past the tokenizer's)."""
    lengths = tokenizer.token_bytes()
    return torch.tensor(lengths + [0] * (vocab_size - len(lengths)))


@torch.no_grad()
def evaluate(model, rows, batch_size: int, token_bytes: torch.Tensor, max_batches: int | None = None,
             device: str = "cpu", autocast=None, show_progress: bool = False, world: World = World()) -> dict:
    """Loss, perplexity, bits per byte and accuracy (the share of targets that are the model's top prediction)
    over the first max_batches batches of `rows`. Under data parallelism a batch is batch_size rows per rank, split
    between the ranks like a training batch, and the sums are global. `model` may be a pipeline (parallel/pipeline.py),
    whose last stage alone returns logits."""
    was_training = model.training
    model.eval()
    token_bytes = token_bytes.to(device)
    global_batch = batch_size * world.dp_size
    n_batches = math.ceil(len(rows) / global_batch)
    if max_batches is not None:
        n_batches = min(n_batches, max_batches)
    nats = torch.zeros((), dtype=exact_dtype(device), device=device)
    nats_with_bytes = torch.zeros_like(nats)
    targets_counted = 0
    bytes_counted = 0
    correct = 0
    causal = model.config.attention == "causal"
    for b in tqdm(range(n_batches), desc="eval", disable=not show_progress, leave=False):
        global_indices = np.arange(b * global_batch, min((b + 1) * global_batch, len(rows)))
        indices = np.array_split(global_indices, world.dp_size)[world.dp_rank]
        counted = len(indices) > 0
        if not counted:  # a short last batch: still run a forward (FSDP's are collective) but count nothing
            indices = global_indices[:1]
        batch = rows.get(indices).to(device)
        with autocast or nullcontext():
            logits = model(batch.inputs, doc_ids=batch.doc_ids).logits
        if logits is None:  # a pipeline stage before the last: it took part in the forward, the last one scores
            continue
        targets = prediction_targets(batch.labels, causal).flatten()
        valid = (targets != -100) & counted
        scored = logits.flatten(0, 1)[valid].float()
        losses = F.cross_entropy(scored, targets[valid], reduction="none").to(nats.dtype)
        correct += int((scored.argmax(dim=-1) == targets[valid]).sum())
        nbytes = token_bytes[targets[valid]]
        nats += losses.sum()
        nats_with_bytes += losses[nbytes > 0].sum()
        targets_counted += int(valid.sum())
        bytes_counted += int(nbytes.sum())
    model.train(was_training)
    sums = torch.tensor([nats.item(), nats_with_bytes.item(), targets_counted, bytes_counted, correct],
                        dtype=nats.dtype, device=device)
    nats, nats_with_bytes, targets_counted, bytes_counted, correct = world.sum_over_dp_(
        world.from_last_stage_(sums)).tolist()
    return _result(nats, nats_with_bytes, int(targets_counted), int(bytes_counted), int(correct))


def _result(nats: float, nats_with_bytes: float, tokens: int, nbytes: int, correct: int) -> dict:
    loss = nats / max(tokens, 1)
    return {
        "loss": loss,
        "perplexity": math.exp(min(loss, 700)),
        "bits_per_byte": nats_with_bytes / math.log(2) / max(nbytes, 1),
        "accuracy": correct / max(tokens, 1),
        "tokens": tokens,
        "bytes": nbytes,
        "correct": correct,
        "nats": nats,
        "nats_with_bytes": nats_with_bytes,
    }


def combine_results(results: list[dict]) -> dict:
    """One result over several evaluations (e.g. per-source validation sets), weighted by tokens and bytes."""
    return _result(*(sum(r[key] for r in results) for key in ("nats", "nats_with_bytes", "tokens", "bytes", "correct")))
