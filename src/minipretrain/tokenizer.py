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
import re
from collections.abc import Iterable, Iterator
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
PIECE_CHARS = 1 << 16  # longer documents are encoded and trained on in pieces of at most this many characters

# Where a text can be cut so that its pieces encode to exactly the tokens of the whole. The byte-level pre-tokenizer
# splits text with GPT-2's regex ('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+) and BPE
# never merges across its splits, so a cut is exact where every match ends and none looks past it:
# 1. before whitespace that follows non-whitespace: no match holds non-whitespace then whitespace, and the only
#    look-ahead, (?!\S), is at the end of a whitespace run (Python's \s is a superset of the regex library's, so
#    its \S is never whitespace there: checked over all of Unicode). A run of whitespace itself is never cut.
# 2. for text without whitespace (Chinese): between a letter, a digit and punctuation, each from a set that every
#    Unicode version classifies alike.
_SPACE_CUT = re.compile(r"(?<=\S)[\t\n\r ]")
_LETTER, _DIGIT = "A-Za-z\u4e00-\u9fa5", "0-9"  # ASCII and the CJK ideographs of Unicode 1.1
_PUNCT = re.escape("!\"#$%&()*+,-./:;<=>?@[\\]^_`{|}~、。，：；？！“”‘’《》（）")  # not ': it can start 's 't ...
_CLASS_CUT = re.compile(f"(?<=[{_LETTER}])(?=[{_DIGIT}{_PUNCT}])|(?<=[{_DIGIT}])(?=[{_LETTER}{_PUNCT}])"
                        f"|(?<=[{_PUNCT}])(?=[{_LETTER}{_DIGIT}])")


def piece_ends(text: str, max_chars: int | None = None, literals: Iterable[str] = ()) -> Iterator[int]:
    """The end of each piece when `text` is cut into pieces of at most `max_chars` (default PIECE_CHARS) characters
    that encode to exactly the tokens of the whole; the last end is len(text). Never cuts through one of `literals`
    (the added tokens, matched before pre-tokenizing). Only a stretch of `max_chars` characters with no exact cut
    (a run of whitespace, or of one character class with no space: a million digits) is cut where it must, and
    only the tokens at that cut may differ."""
    max_chars = max_chars or PIECE_CHARS
    literals = [t for t in literals if len(t) > 1]
    start = 0
    while len(text) - start > max_chars:
        start = _last_cut(text, start, start + max_chars, literals)
        yield start
    yield len(text)


def _last_cut(text: str, start: int, stop: int, literals: list[str]) -> int:
    """The last exact cut in text(start, stop), searched for in a growing tail (the first try almost always finds
    one); else stop, or just before it outside any literal."""
    for pattern in (_SPACE_CUT, _CLASS_CUT):
        tail = 1024
        while True:
            lo = max(start + 1, stop - tail)
            cuts = [m.start() for m in pattern.finditer(text, lo, stop)]
            cut = next((c for c in reversed(cuts) if not _inside_literal(text, c, literals)), None)
            if cut is not None:
                return cut
            if lo == start + 1:
                break
            tail *= 16
    return next((cut for cut in range(stop, start, -1) if not _inside_literal(text, cut, literals)), stop)


def _inside_literal(text: str, cut: int, literals: list[str]) -> bool:
    # any occurrence inside text[cut - len + 1 : cut + len - 1] spans the cut
    return any(text.find(t, max(cut - len(t) + 1, 0), cut + len(t) - 1) >= 0 for t in literals)


def document_pieces(texts: Iterable[str], max_chars: int | None = None) -> Iterator[str]:
    """Each text, cut by piece_ends: what the trainer is fed, so that one huge document costs no more memory than
    many small ones (its word counts, and so the tokenizer, are the same)."""
    for text in texts:
        start = 0
        for end in piece_ends(text, max_chars):
            yield text[start:end]
            start = end


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

    def piece_ends(self, text: str, max_chars: int | None = None) -> Iterator[int]:
        """piece_ends() for this tokenizer: cuts that spare its added tokens; no cut at all when its normalizer or
        pre-tokenizer is not the byte-level one the cuts are exact for (documents are then encoded whole)."""
        if self._cut_literals is None:
            return iter([len(text)])
        return piece_ends(text, max_chars, self._cut_literals)

    @cached_property
    def _cut_literals(self) -> list[str] | None:
        spec = json.loads(self.hf.to_str())
        pre = spec.get("pre_tokenizer") or {}
        added = spec.get("added_tokens") or []
        byte_level = (spec.get("normalizer") is None and pre.get("type") == "ByteLevel"
                      and pre.get("use_regex", True) and not pre.get("add_prefix_space"))
        if not byte_level or any(t.get("lstrip") or t.get("rstrip") for t in added):  # they take in whitespace
            return None
        return [t["content"] for t in added]

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
    """Train byte-level BPE on an iterator of documents (streamed: the corpus is never held in memory, nor a whole
    long document: the trainer sees pieces of at most PIECE_CHARS characters, see document_pieces)."""
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
    hf.train_from_iterator(document_pieces(texts), trainer=trainer, length=length)
    return Tokenizer(hf)
