"""Byte-level BPE tokenizer with MiniMind's special tokens, trained and loaded with the `tokenizers` library.

Byte-level means every UTF-8 string maps to tokens and back exactly: there is no unknown token. The one exception
is by design: the literal strings of the special tokens (`<|im_start|>` ...) encode as the special ids, as in
MiniMind, whose pretraining data marks documents with them; decoding drops special tokens.
Ids 0-2 are MiniMind's; new tokenizers also reserve ids 3-7 for the fill-in-the-middle and masked-LM objectives.
Older tokenizers with only ids 0-2 (MiniMind's own) still load and train the causal LM objective.
The saved directory (tokenizer.json + tokenizer_config.json) loads in `transformers.PreTrainedTokenizerFast`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from functools import cached_property
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from minipretrain.errors import UserError

PAD, BOS, EOS = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
FIM_PREFIX, FIM_MIDDLE, FIM_SUFFIX, FIM_PAD = "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>"
MASK = "<|mask|>"
MINIMIND_TOKENS = [PAD, BOS, EOS]  # ids 0, 1, 2, as in MiniMind
OBJECTIVE_TOKENS = [FIM_PREFIX, FIM_MIDDLE, FIM_SUFFIX, FIM_PAD, MASK]  # ids 3-7 (StarCoder / Qwen2.5-Coder names)
SPECIAL_TOKENS = MINIMIND_TOKENS + OBJECTIVE_TOKENS  # what a new tokenizer reserves; ordinary tokens follow
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map from each byte to a printable character: byte-level BPE vocabularies are spelled in these."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


class Tokenizer:
    """A thin wrapper: encode/decode, the special ids, and a fingerprint that identifies the vocabulary."""

    def __init__(self, hf: HFTokenizer, source: str = "the tokenizer"):
        self.hf = hf
        self.source = source  # how errors name it: its directory when loaded from one
        for expected, token in enumerate(MINIMIND_TOKENS):
            if hf.token_to_id(token) != expected:
                raise UserError(f"tokenizer: special token {token} must have id {expected}, "
                                f"has {hf.token_to_id(token)}")
        self.pad_id, self.bos_id, self.eos_id = 0, 1, 2
        # The objective tokens' ids (None without them); ids from first_ordinary_id on are text, the only ones
        # fill-in-the-middle splits and masked LM chooses.
        self.has_objective_tokens = all(hf.token_to_id(t) == i for i, t in enumerate(SPECIAL_TOKENS))
        ids = range(3, 8) if self.has_objective_tokens else [None] * 5
        self.fim_prefix_id, self.fim_middle_id, self.fim_suffix_id, self.fim_pad_id, self.mask_id = ids
        self.first_ordinary_id = len(SPECIAL_TOKENS)

    def require_objective_tokens(self, what: str) -> None:
        """A one-line error when `what` (e.g. "train.objective=fim") needs ids 3-7 and this tokenizer lacks them."""
        if not self.has_objective_tokens:
            raise UserError(f"{what} needs the special tokens {' '.join(OBJECTIVE_TOKENS)} at ids 3-7, which "
                            f"{self.source} lacks (an older or MiniMind tokenizer): train a new one with "
                            "`minipretrain tokenizer train` and pass it as data.tokenizer")

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size()

    @cached_property
    def fingerprint(self) -> str:
        """sha256 of the canonical tokenizer JSON: equal fingerprints encode every text identically."""
        return hashlib.sha256(self.hf.to_str().encode("utf-8")).hexdigest()[:16]

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.hf.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=True)

    def token_bytes(self) -> list[int]:
        """UTF-8 byte length of every token (0 for special tokens), for bits-per-byte."""
        byte_of = {c: b for b, c in _bytes_to_unicode().items()}
        lengths = [0] * self.vocab_size
        special = {t.content for t in self.hf.get_added_tokens_decoder().values() if t.special}
        for token, idx in self.hf.get_vocab().items():
            if token not in special:
                lengths[idx] = sum(1 for c in token if c in byte_of)
        return lengths

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.hf.save(str(directory / TOKENIZER_FILE))
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": BOS,
            "eos_token": EOS,
            "pad_token": PAD,
            "unk_token": PAD,
            "add_bos_token": False,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
            "model_max_length": 32768,
        }
        if self.has_objective_tokens:
            config.update(mask_token=MASK, additional_special_tokens=[FIM_PREFIX, FIM_MIDDLE, FIM_SUFFIX, FIM_PAD])
        (directory / TOKENIZER_CONFIG_FILE).write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")

    @classmethod
    def load(cls, directory: str | Path) -> Tokenizer:
        path = Path(directory) / TOKENIZER_FILE
        if not path.is_file():
            raise UserError(f"no {TOKENIZER_FILE} in {directory}: train one with `minipretrain tokenizer train`")
        try:
            hf = HFTokenizer.from_file(str(path))
        except Exception as e:  # the tokenizers library raises a bare Exception on malformed files
            raise UserError(f"{path}: not a valid tokenizer file ({e})") from None
        return cls(hf, source=f"the tokenizer in {directory}")


def train_tokenizer(texts: Iterable[str], vocab_size: int = 6400, show_progress: bool = True,
                    length: int | None = None) -> Tokenizer:
    """Train byte-level BPE on an iterator of documents (streamed: the corpus is never held in memory)."""
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise UserError(f"--vocab-size {vocab_size} is too small: byte-level BPE needs at least "
                        f"{256 + len(SPECIAL_TOKENS)} (256 bytes + {len(SPECIAL_TOKENS)} special tokens)")
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    hf.train_from_iterator(texts, trainer=trainer, length=length)
    return Tokenizer(hf)
