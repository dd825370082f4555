"""Training objectives: pure transforms of one example (tokens, labels, doc_ids) into another of the same length.

    objective = make_objective(cfg.train, tokenizer)          # CausalLM, FillInTheMiddle or MaskedLM
    tokens, labels, doc_ids = objective(example, key=(seed, source, draw))

A transform depends only on the example and its key (its random draws come from a generator seeded with the key),
so the sampler's few integers still resume a run exactly and every rank computes the same rows. Labels stay
aligned with the tokens (-100: no loss); a causal model shifts them, a bidirectional one does not.

- clm: the identity.
- fim (Bavarian et al. 2022, "Efficient Training of Language Models to Fill in the Middle", in the layout of
  StarCoder and bigcode's Megatron-LM): each segment of a row, i.e. each run of text tokens between special tokens
  (a document, or the part of one at a row's edge), is with probability fim_rate decoded, cut at two uniformly
  random characters into prefix / middle / suffix, re-encoded and laid out as
      PSM   <|fim_prefix|> prefix <|fim_suffix|> suffix <|fim_middle|> middle
      SPM   <|fim_prefix|> <|fim_suffix|> suffix <|fim_middle|> prefix middle       (fim_spm_rate of them)
  in exactly the segment's length (fim_layout), so eos positions, doc_ids and the row length stay. Every token is
  trained as in causal LM, except <|fim_pad|> and positions whose label was already -100.
- mlm (BERT): each text token is chosen with probability mlm_probability; a chosen token becomes <|mask|> (80%), a
  random text token (10%) or stays itself (10%). Labels: the original token where chosen, -100 elsewhere. A row
  may get no chosen token (short rows, rarely): it then adds nothing to the loss, which is weighted by tokens.
"""

from __future__ import annotations

import numpy as np

IGNORE = -100
EVAL_SEED = 0  # validation transforms row i with key (EVAL_SEED, i): the same masks and middles whatever train.seed

# What each position of a FIM layout holds (the second array fim_layout returns).
SENTINEL, PREFIX, MIDDLE, SUFFIX, PAD = range(5)

# Mixed into every key: the sampler's shuffles are seeded with (seed, source, epoch), which a (seed, source, draw)
# key would otherwise repeat.
_KEY_DOMAIN = 0x0B1EC7


def _rng(key: tuple[int, ...]) -> np.random.Generator:
    return np.random.default_rng((_KEY_DOMAIN, *key))


class CausalLM:
    name, bidirectional = "clm", False

    def __call__(self, example, key):
        return example


def text_segments(tokens: np.ndarray, first_ordinary_id: int) -> list[tuple[int, int]]:
    """[start, end) of each maximal run of text tokens (ids >= first_ordinary_id): a row's documents, cut at eos,
    bos and padding, and at the row's edges."""
    is_text = np.concatenate([[False], tokens >= first_ordinary_id, [False]])
    edges = np.flatnonzero(is_text[1:] != is_text[:-1])
    return list(zip(edges[::2].tolist(), edges[1::2].tolist(), strict=True))


def fim_layout(tokenizer, prefix: list[int], middle: list[int], suffix: list[int], length: int,
               spm: bool) -> tuple[np.ndarray, np.ndarray] | None:
    """A segment laid out as PSM or SPM in exactly `length` tokens: (tokens, the part each position holds), or None
    when it cannot fit. As in bigcode's Megatron-LM, a layout that comes out longer loses the end of its suffix
    (None when the suffix is shorter than the excess) and one that comes out shorter pads the suffix with
    <|fim_pad|>; the middle, which generation continues, always ends the layout."""
    excess = len(prefix) + len(middle) + len(suffix) + 3 - length
    if excess > len(suffix):
        return None
    suffix = suffix[: len(suffix) - max(excess, 0)]
    pad = [tokenizer.fim_pad_id] * max(-excess, 0)
    t = tokenizer
    if spm:
        pieces = [([t.fim_prefix_id, t.fim_suffix_id], SENTINEL), (suffix, SUFFIX), (pad, PAD),
                  ([t.fim_middle_id], SENTINEL), (prefix, PREFIX), (middle, MIDDLE)]
    else:
        pieces = [([t.fim_prefix_id], SENTINEL), (prefix, PREFIX), ([t.fim_suffix_id], SENTINEL), (suffix, SUFFIX),
                  (pad, PAD), ([t.fim_middle_id], SENTINEL), (middle, MIDDLE)]
    tokens = np.concatenate([np.asarray(ids, dtype=np.int64) for ids, _ in pieces])
    parts = np.concatenate([np.full(len(ids), part, dtype=np.int8) for ids, part in pieces])
    return tokens, parts


def fim_prompt(tokenizer, prefix: str, suffix: str) -> list[int]:
    """The PSM prompt whose continuation, up to eos, is the middle."""
    return ([tokenizer.fim_prefix_id] + tokenizer.encode(prefix) + [tokenizer.fim_suffix_id]
            + tokenizer.encode(suffix) + [tokenizer.fim_middle_id])


class FillInTheMiddle:
    name, bidirectional = "fim", False

    def __init__(self, tokenizer, rate: float = 0.5, spm_rate: float = 0.5, middle_loss_only: bool = False):
        """middle_loss_only: labels on the middle's tokens only, what infilling is scored on (with rate 1)."""
        self.tokenizer, self.rate, self.spm_rate, self.middle_loss_only = tokenizer, rate, spm_rate, middle_loss_only

    def __call__(self, example, key):
        tokens, labels, doc_ids = example
        rng = _rng(key)
        tokens = np.array(tokens, dtype=np.int64)  # copies: the example may be a read-only memory map
        labels = np.full_like(tokens, IGNORE) if self.middle_loss_only else np.array(labels, dtype=np.int64)
        for start, end in text_segments(tokens, self.tokenizer.first_ordinary_id):
            if rng.random() >= self.rate:
                continue
            text = self.tokenizer.decode(tokens[start:end].tolist())
            cut1, cut2 = np.sort(rng.integers(0, len(text) + 1, size=2))
            spm = rng.random() < self.spm_rate
            pieces = [self.tokenizer.encode(piece) for piece in (text[:cut1], text[cut1:cut2], text[cut2:])]
            layout = fim_layout(self.tokenizer, *pieces, end - start, spm)
            if layout is None:  # too short to hold three sentinels and a cut suffix: stays plain
                continue
            segment, parts = layout
            tokens[start:end] = segment
            if self.middle_loss_only:
                labels[start:end] = np.where(parts == MIDDLE, segment, IGNORE)
            else:
                labels[start:end] = np.where((parts == PAD) | (labels[start:end] == IGNORE), IGNORE, segment)
        return tokens, labels, doc_ids


class MaskedLM:
    name, bidirectional = "mlm", True

    def __init__(self, tokenizer, probability: float = 0.15):
        self.probability = probability
        self.mask_id, self.first_text_id, self.vocab_size = (tokenizer.mask_id, tokenizer.first_ordinary_id,
                                                             tokenizer.vocab_size)

    def __call__(self, example, key):
        tokens, _, doc_ids = example
        rng = _rng(key)
        tokens = np.asarray(tokens, dtype=np.int64)
        chosen = (tokens >= self.first_text_id) & (rng.random(len(tokens)) < self.probability)
        action = rng.random(len(tokens))  # < 0.8: mask, >= 0.9: random token, else keep
        inputs = tokens.copy()
        inputs[chosen & (action < 0.8)] = self.mask_id
        randomised = chosen & (action >= 0.9)
        inputs[randomised] = rng.integers(self.first_text_id, self.vocab_size, size=int(randomised.sum()))
        return inputs, np.where(chosen, tokens, IGNORE), doc_ids


def make_objective(t, tokenizer):
    """The training transform for `t` (the train config section); a one-line error when the tokenizer lacks the
    special tokens the objective needs."""
    if t.objective == "clm":
        return CausalLM()
    tokenizer.require_objective_tokens(f"train.objective={t.objective}")
    if t.objective == "fim":
        return FillInTheMiddle(tokenizer, t.fim_rate, t.fim_spm_rate)
    return MaskedLM(tokenizer, t.mlm_probability)


def validation_objective(objective):
    """What val_loss scores: the masked tokens for mlm; for clm and fim the plain left-to-right loss, so that fim
    and clm runs compare (fim runs also report val_fim_loss, on fim_middles)."""
    return objective if objective.bidirectional else CausalLM()


def fim_middles(tokenizer) -> FillInTheMiddle:
    """Infilling as scored by val_fim_loss and `eval --fim`: every segment in PSM, loss on its middle only."""
    return FillInTheMiddle(tokenizer, rate=1.0, spm_rate=0.0, middle_loss_only=True)
