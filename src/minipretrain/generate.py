"""Sampling with a KV cache: temperature, top-k, top-p, a token budget, stop at eos; filling in the middle (causal
models trained with train.objective=fim) and filling masks (masked LMs)."""

from __future__ import annotations

import torch

from minipretrain.data.objectives import fim_prompt
from minipretrain.errors import UserError
from minipretrain.model import KVCache, MiniMind
from minipretrain.tokenizer import MASK


def sample_next(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None,
                generator: torch.Generator | None) -> torch.Tensor:
    """logits: (batch, vocab) -> (batch,) token ids. temperature 0 means greedy."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and 0 < top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and 0 < top_p < 1:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # drop a token once the tokens before it already cover top_p (the most likely one always stays)
        drop = probs.cumsum(dim=-1) - probs > top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model: MiniMind, prompt_ids: list[int], max_new_tokens: int = 64, temperature: float = 0.8,
             top_k: int | None = None, top_p: float | None = None, eos_id: int | None = None,
             use_cache: bool = True, generator: torch.Generator | None = None,
             device: torch.device | str | None = None) -> list[int]:
    """Continue one prompt; returns only the new tokens (without the eos that stopped it). `device`: where the
    model computes (default: where its first parameter lives, which is the CPU when FSDP offloads parameters, so
    the trainer passes its device)."""
    if not prompt_ids:
        raise ValueError("generate needs at least one prompt token")
    was_training = model.training
    model.eval()
    device = device if device is not None else next(model.parameters()).device
    room = model.config.max_position_embeddings - len(prompt_ids)
    if room <= 0:
        raise UserError(f"the prompt's {len(prompt_ids)} tokens leave no room within the model's "
                         f"max_position_embeddings={model.config.max_position_embeddings}")
    ids = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    cache = KVCache() if use_cache else None
    new: list[int] = []
    step_input = ids
    for _ in range(min(max_new_tokens, room)):
        logits = model(step_input if use_cache else ids, cache=cache).logits[:, -1, :]
        token = sample_next(logits, temperature, top_k, top_p, generator)
        if eos_id is not None and token.item() == eos_id:
            break
        new.append(token.item())
        step_input = token.view(1, 1)
        ids = torch.cat([ids, step_input], dim=1)
    model.train(was_training)
    return new


def complete(model: MiniMind, tokenizer, prompt: str, max_new_tokens: int, temperature: float = 0.8,
             top_k: int | None = None, top_p: float | None = 0.95, use_cache: bool = True,
             generator: torch.Generator | None = None, device: torch.device | str | None = None) -> str:
    """Prompt text -> prompt + continuation. An empty prompt starts a new document (after eos, as in packing)."""
    prompt_ids = tokenizer.encode(prompt) if prompt else [tokenizer.eos_id]
    new = generate(model, prompt_ids, max_new_tokens, temperature, top_k, top_p, tokenizer.eos_id, use_cache,
                   generator, device)
    return prompt + tokenizer.decode(new)


def infill(model: MiniMind, tokenizer, prefix: str, suffix: str, max_new_tokens: int, temperature: float = 0.8,
           top_k: int | None = None, top_p: float | None = 0.95, use_cache: bool = True,
           generator: torch.Generator | None = None, device: torch.device | str | None = None) -> str:
    """The middle between prefix and suffix: the continuation of the PSM prompt up to eos."""
    new = generate(model, fim_prompt(tokenizer, prefix, suffix), max_new_tokens, temperature, top_k, top_p,
                   tokenizer.eos_id, use_cache, generator, device)
    return tokenizer.decode(new)


@torch.no_grad()
def fill_mask(model: MiniMind, tokenizer, text: str, top_k: int, start_id: int,
              device: torch.device | str = "cpu") -> tuple[str, list[list[tuple[str, float]]]]:
    """The text with each <|mask|> replaced by its most likely token, and for each mask the top_k text tokens with
    their probabilities. The text is one document: start_id (eos in packed rows, bos in padded ones) + text + eos.
    A mask stands for a whole token, and byte-level BPE words carry their leading space, so " <|mask|>" is read as
    "<|mask|>" (as RoBERTa's <mask> does)."""
    text = text.replace(" " + MASK, MASK)
    ids = [start_id] + tokenizer.encode(text) + [tokenizer.eos_id]
    if len(ids) > model.config.max_position_embeddings:
        raise UserError(f"the text's {len(ids)} tokens exceed the model's "
                        f"max_position_embeddings={model.config.max_position_embeddings}")
    was_training = model.training
    model.eval()
    logits = model(torch.tensor([ids], device=device)).logits[0].float()
    model.train(was_training)
    positions = [i for i, token in enumerate(ids) if token == tokenizer.mask_id]
    scores = logits[positions]
    scores[:, : tokenizer.first_ordinary_id] = float("-inf")  # masked LM never predicts special tokens
    scores[:, tokenizer.vocab_size:] = float("-inf")  # nor the ids the model has beyond the tokenizer's
    probs, top = scores.softmax(dim=-1).topk(min(top_k, tokenizer.vocab_size - tokenizer.first_ordinary_id))
    predictions = [[(tokenizer.decode([t]), p) for t, p in zip(row_ids.tolist(), row_probs.tolist(), strict=True)]
                   for row_ids, row_probs in zip(top, probs, strict=True)]
    for candidates in predictions:
        text = text.replace(MASK, candidates[0][0], 1)
    return text, predictions
