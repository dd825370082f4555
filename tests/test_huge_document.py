"""One huge document: it is tokenized (and fed to the tokenizer trainer) in pieces cut where the byte-level
pre-tokenizer splits anyway, so memory is bounded and the tokens are exactly those of encoding it whole."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import numpy as np
import pytest
from conftest import shared_file
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import normalizers

from minipretrain import tokenizer as tokenizer_mod
from minipretrain.data import shards as shards_mod
from minipretrain.data.shards import PreparedData, PrepareOptions, is_held_out, prepare
from minipretrain.tokenizer import _CLASS_CUT, _SPACE_CUT, SPECIAL_TOKENS, Tokenizer, piece_ends, train_tokenizer

ENGLISH = shared_file("tinyshakespeare.txt").read_text(encoding="utf-8")[:60_000]
CHINESE = shared_file("zh-novel-xiyouji.txt").read_bytes().decode("utf-8")[:30_000]  # CRLF, full-width spaces kept


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    """English and Chinese merges, so that a wrong cut would change real multi-byte tokens."""
    return train_tokenizer([ENGLISH, CHINESE, "  \n\n\t\t   \r\n" * 50, "1234567890" * 50], 800, show_progress=False)


def encode_in_pieces(tok: Tokenizer, text: str, max_chars: int) -> tuple[list[int], list[int]]:
    """(the tokens of text's pieces, concatenated; the pieces' lengths)."""
    tokens, lengths, start = [], [], 0
    for end in tok.piece_ends(text, max_chars):
        tokens += tok.encode(text[start:end])
        lengths.append(end - start)
        start = end
    assert start == len(text)
    return tokens, lengths


def random_text(rng: random.Random, alphabet: list[str], n: int) -> str:
    return "".join(rng.choice(alphabet) for _ in range(n))


ADVERSARIAL = ["a", "b", " ", "  ", "\n", "\n\n", "\r\n", "\t", "'", "'s", "'re", "'ll", "1", "2", ".", ",", "-", "_",
               "<", "|", ">", "\u3000", "\xa0", "\x1c", "\x85", "\u2028", "\u200b", "孙", "悟", "。", "，", "“", "’",
               "é", "e\u0301", "ß", "😀", "٣", "Ⅻ", "<|im_start|>", "<|im_end|>", "<|fim_prefix|>"]


def texts() -> dict[str, str]:
    rng = random.Random(0)
    return {
        "English": ENGLISH,
        "Chinese, CRLF and full-width spaces": CHINESE,
        "Chinese without whitespace": "".join(CHINESE.split()),
        "runs of spaces and newlines": "".join(  # runs of up to 300 characters: cut around, never inside
            rng.choice(["word", "x.", "孙"]) + rng.choice([" " * rng.randint(1, 300), "\n" * rng.randint(1, 300),
                                                        "\r\n\r\n", "\t \n", " \u3000"]) for _ in range(400)),
        "special tokens": "<|im_start|>hello, world<|im_end|>x<|fim_prefix|>y'z" * 300,
        "digits and punctuation": random_text(rng, list("0123456789.,;:-+"), 20_000),
        "adversarial": random_text(rng, ADVERSARIAL, 20_000),
    }


@pytest.mark.parametrize("name", list(texts()))
def test_pieces_encode_to_the_tokens_of_the_whole(tokenizer, name):
    text = texts()[name]
    pieces, lengths = encode_in_pieces(tokenizer, text, 500)
    assert len(lengths) > 10 and max(lengths) <= 500
    assert pieces == tokenizer.encode(text)


def test_every_cut_the_rule_allows_is_exact(tokenizer):
    """Not just the cuts piece_ends picks: every position either cut rule matches, in short adversarial texts."""
    rng, checked = random.Random(1), 0
    for _ in range(1500):
        text = random_text(rng, ADVERSARIAL, rng.randint(1, 30))
        whole = tokenizer.encode(text)
        for pattern in (_SPACE_CUT, _CLASS_CUT):
            for match in pattern.finditer(text, 1):
                cut = match.start()
                if tokenizer_mod._inside_literal(text, cut, SPECIAL_TOKENS):
                    continue
                assert tokenizer.encode(text[:cut]) + tokenizer.encode(text[cut:]) == whole, (text[:cut], text[cut:])
                checked += 1
    assert checked > 5000


@pytest.mark.parametrize("text", ["a" * 5000, " " * 5000, "\n" * 5000, "孙" * 5000, "<|im_end|>" * 500])
def test_text_without_an_exact_cut_is_still_cut_to_the_bound(text):
    """The documented fallback: memory stays bounded; only the tokens at such a cut may differ."""
    ends = list(piece_ends(text, 300, SPECIAL_TOKENS))
    lengths = np.diff([0, *ends])
    assert ends[-1] == len(text) and lengths.min() > 0 and lengths.max() <= 300


def test_a_literal_is_never_cut(tokenizer):
    text = "<|im_end|>" * 500
    ends = list(tokenizer.piece_ends(text, 305))
    assert all(end % len("<|im_end|>") == 0 for end in ends)
    assert encode_in_pieces(tokenizer, text, 305)[0] == tokenizer.encode(text)


def test_a_tokenizer_the_cut_rule_is_not_shown_for_encodes_documents_whole(tokenizer):
    other = Tokenizer(HFTokenizer.from_str(tokenizer.hf.to_str()))
    other.hf.normalizer = normalizers.Lowercase()
    assert list(other.piece_ends(ENGLISH, 500)) == [len(ENGLISH)]


# --- data prepare and tokenizer train -------------------------------------------------------------------------------


def write_jsonl(path: Path, documents: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in documents), encoding="utf-8")
    return path


HUGE = [ENGLISH + CHINESE, "short one", CHINESE + ENGLISH, "another short one", "".join(CHINESE.split())]


@pytest.mark.parametrize("workers", [1, 2])
def test_prepare_writes_huge_documents_as_encoding_them_whole(tmp_path, tokenizer, monkeypatch, workers):
    monkeypatch.setattr(tokenizer_mod, "PIECE_CHARS", 2000)  # 90,000-character documents in ~45 pieces
    monkeypatch.setattr(shards_mod, "CHUNK_BYTES", 5000)  # and each spread over many chunks
    src = write_jsonl(tmp_path / "huge.jsonl", HUGE)
    prepare([str(src)], tokenizer, tmp_path / "out", PrepareOptions(val_fraction=0.3, shard_tokens=3000,
                                                                    workers=workers), show_progress=False)
    data = PreparedData(tmp_path / "out", tokenizer.fingerprint)
    held = is_held_out(np.arange(len(HUGE)), 0.3)
    for split, expected in (("train", [t for t, h in zip(HUGE, held, strict=True) if not h]),
                            ("val", [t for t, h in zip(HUGE, held, strict=True) if h])):
        stream = data.split(split)
        assert stream.num_documents == len(expected) and len(expected) > 0
        for i, text in enumerate(expected):
            assert stream.document(i).tolist() == tokenizer.encode(text) + [tokenizer.eos_id]
    shards = data.manifest["splits"]["train"]["shards"]
    assert len(shards) > 1 and all(s["documents"] > 0 for s in shards)  # documents never straddle shards


def test_prepare_hands_the_tokenizer_bounded_pieces(tmp_path, tokenizer, monkeypatch):
    """The memory bound, without timing anything: no call to the tokenizer sees more than a chunk and a piece."""
    monkeypatch.setattr(tokenizer_mod, "PIECE_CHARS", 1000)
    monkeypatch.setattr(shards_mod, "CHUNK_BYTES", 3000)
    seen = []
    real = Tokenizer.encode_batch

    def spy(self, batch):
        seen.append([len(t) for t in batch])
        return real(self, batch)

    monkeypatch.setattr(Tokenizer, "encode_batch", spy)
    prepare([str(write_jsonl(tmp_path / "huge.jsonl", HUGE))], tokenizer, tmp_path / "out",
            PrepareOptions(workers=1), show_progress=False)
    assert max(max(call) for call in seen) <= 1000
    assert max(sum(call) for call in seen) < 3000 + 1000
    assert sum(map(sum, seen)) == sum(map(len, HUGE))


def test_tokenizer_training_sees_bounded_pieces_and_learns_the_same_merges(monkeypatch):
    corpus = [ENGLISH + CHINESE, "".join(CHINESE.split())]
    monkeypatch.setattr(tokenizer_mod, "PIECE_CHARS", 10**9)
    whole = train_tokenizer(corpus, 600, show_progress=False)
    seen = []
    real = tokenizer_mod.document_pieces

    def spy(texts, max_chars=None):
        for piece in real(texts, max_chars):
            seen.append(len(piece))
            yield piece

    monkeypatch.setattr(tokenizer_mod, "PIECE_CHARS", 1000)
    monkeypatch.setattr(tokenizer_mod, "document_pieces", spy)
    in_pieces = train_tokenizer(corpus, 600, show_progress=False)
    assert max(seen) <= 1000 and sum(seen) == sum(map(len, corpus))
    assert in_pieces.hf.to_str() == whole.hf.to_str()


def test_the_character_sets_of_the_cut_rule_match_the_pre_tokenizer():
    """Each letter, digit and punctuation character the rule names is that class to the tokenizers library too."""
    from tokenizers.pre_tokenizers import ByteLevel

    from minipretrain.tokenizer import _DIGIT, _LETTER, _PUNCT

    split = ByteLevel(add_prefix_space=False).pre_tokenize_str
    for chars, same_class_as in ((_LETTER, "a"), (_DIGIT, "1"), (_PUNCT, "!")):
        members = [chr(c) for c in range(0x10000) if re.fullmatch(f"[{chars}]", chr(c))]
        assert len(members) >= 10
        for c in members:
            assert [len(split(probe + c)) for probe in "a1!"] == [1 if p == same_class_as else 2 for p in "a1!"], c
