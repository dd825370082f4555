"""Tokenizer: special ids, exact byte-level round trips, save/load, transformers compatibility, token bytes, CLI."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from minipretrain.cli import main
from minipretrain.errors import UserError
from minipretrain.tokenizer import (
    BOS,
    EOS,
    PAD,
    SPECIAL_TOKENS,
    TOKENIZER_CONFIG_FILE,
    TOKENIZER_FILE,
    Tokenizer,
    train_tokenizer,
)

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
VOCAB = 1000


def shared(name: str) -> Path:
    path = SHARED / name
    if not path.is_file():
        pytest.skip(f"shared corpus {path} not present")
    return path


def read_chars(path: Path, start: int, count: int) -> str:
    """`count` characters from character `start`, line ends kept as they are in the file (CRLF stays CRLF)."""
    with open(path, encoding="utf-8", newline="") as f:
        f.read(start)
        return f.read(count)


def code_records(start: int, count: int) -> list[str]:
    out = []
    with open(shared("cpython-3.11.7-stdlib-code.jsonl"), encoding="utf-8") as f:
        for i, line in enumerate(f):
            if i >= start + count:
                break
            if i >= start:
                out.append(json.loads(line)["text"])
    return out


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    """About 250 KB: English, Chinese (CRLF) and Python code, in documents."""
    english = read_chars(shared("tinyshakespeare.txt"), 0, 80_000).split("\n\n")
    chinese = read_chars(shared("zh-novel-xiyouji.txt"), 0, 30_000).split("\r\n\r\n")
    code = [c for c in code_records(0, 12) if len(c) < 40_000]
    return english + chinese + code


@pytest.fixture(scope="module")
def tok(corpus) -> Tokenizer:
    return train_tokenizer(corpus, vocab_size=VOCAB, show_progress=False)


@pytest.fixture(scope="module")
def samples() -> dict[str, str]:
    """Texts outside the training slices, plus hand-made edge cases."""
    return {
        "english": read_chars(shared("tinyshakespeare.txt"), 500_000, 3000),
        "english_spaces": "  Leading and   inner   spaces,\ttabs\t\tand trailing  \n\n\nlines.\n ",
        "chinese_crlf": read_chars(shared("zh-novel-xiyouji.txt"), 300_000, 2000),
        "chinese_fullwidth": "\u3000\u3000话表齐天大圣到底是个妖猴。\r\n\r\n\u3000\u3000却说那大圣，「你好」！？\r\n",
        "code": code_records(300, 1)[0][:6000],
        "code_edge": 'def f(x):\n\tif x:\r\n        return {"a": [1, 2]}  # 注释\n\n\n',
        "emoji": "Hi 👋🏽 family 👨‍👩‍👧‍👦 flag 🇯🇵 heart ❤️ robot 🤖 keycap 1️⃣",
        "unicode": "𠀀𪚥 Ωmega ≈ç√∫ ﷽ e\u0301 Å ﬁ ½ ⅷ \u200b\u200d\ufeff \u00a0 \u2028 "
                   "Ελληνικά Русский العربية हिन्दी 한국어 ไทย",
        "controls": "\x00\x01\x07\x1b[31mred\x1b[0m\x7f\x80\x9f end",
        "mixed_newlines": "a\rb\r\nc\nd\n\r",
        "single_char": "x",
        "space": " ",
    }


# --- special tokens ------------------------------------------------------------------------------------------------


def test_special_token_ids(tok):
    assert [tok.hf.token_to_id(t) for t in (PAD, BOS, EOS)] == [0, 1, 2]
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    assert SPECIAL_TOKENS == ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|fim_prefix|>", "<|fim_middle|>",
                              "<|fim_suffix|>", "<|fim_pad|>", "<|mask|>"]
    assert [tok.hf.id_to_token(i) for i in range(8)] == SPECIAL_TOKENS
    assert tok.has_objective_tokens and tok.first_ordinary_id == 8
    assert (tok.fim_prefix_id, tok.fim_middle_id, tok.fim_suffix_id, tok.fim_pad_id, tok.mask_id) == (3, 4, 5, 6, 7)


def test_vocab_size(tok):
    assert 264 <= tok.vocab_size <= VOCAB
    assert tok.vocab_size == VOCAB  # 250 KB is plenty for 1000 merges


def test_ordinary_text_never_yields_special_ids(tok, samples):
    for name, text in samples.items():
        ids = tok.encode(text)
        assert not set(range(len(SPECIAL_TOKENS))) & set(ids), name


def test_vocab_too_small():
    with pytest.raises(UserError) as e:
        train_tokenizer(["abc"], vocab_size=263, show_progress=False)
    assert "263" in str(e.value) and "at least 264 (256 bytes + 8 special tokens)" in str(e.value)


def test_wrong_special_ids_rejected():
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models

    hf = HFTokenizer(models.BPE())
    hf.add_special_tokens([BOS, PAD, EOS])  # PAD at id 1
    with pytest.raises(UserError):
        Tokenizer(hf)


# --- round trips --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["english", "english_spaces", "chinese_crlf", "chinese_fullwidth", "code",
                                  "code_edge", "emoji", "unicode", "controls", "mixed_newlines", "single_char",
                                  "space"])
def test_round_trip_exact(tok, samples, name):
    text = samples[name]
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text


def test_round_trip_samples_contain_what_they_claim(samples):
    assert all(len(text) > 0 for text in samples.values())
    assert len(samples["english"]) == 3000 and len(samples["chinese_crlf"]) == 2000
    assert "\r\n" in samples["chinese_crlf"]
    assert "\u3000" in samples["chinese_fullwidth"]
    assert "def " in samples["code"] or "class " in samples["code"] or "import " in samples["code"]


def test_round_trip_empty(tok):
    assert tok.encode("") == []
    assert tok.decode([]) == ""


def test_round_trip_random_unicode(tok):
    rng = random.Random(0)
    ranges = [(0x20, 0x7E), (0x00, 0x1F), (0xA0, 0x2FFF), (0x3000, 0x9FFF), (0xAC00, 0xD7A3), (0xE000, 0xFFFD),
              (0x10000, 0x10FFFF)]
    for _ in range(300):
        chars = []
        for _ in range(rng.randint(1, 40)):
            lo, hi = rng.choice(ranges)
            chars.append(chr(rng.randint(lo, hi)))
        text = "".join(chars)
        assert tok.decode(tok.encode(text)) == text, ascii(text)


def test_encode_batch_matches_encode(tok, samples):
    texts = list(samples.values())
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]


def test_tokenizer_compresses_its_training_languages(tok, samples):
    for name in ("english", "chinese_crlf", "code"):
        text = samples[name]
        assert len(tok.encode(text)) < 0.8 * len(text.encode("utf-8")), name


def test_decode_skips_special_tokens(tok):
    ids = tok.encode("hello")
    assert tok.decode([tok.bos_id] + ids + [tok.eos_id, tok.pad_id]) == "hello"


# --- token bytes --------------------------------------------------------------------------------------------------


def test_token_bytes(tok, samples):
    lengths = tok.token_bytes()
    assert len(lengths) == tok.vocab_size
    assert lengths[:8] == [0] * 8  # special tokens spell no bytes
    assert all(n >= 1 for n in lengths[8:])
    for name, text in samples.items():
        ids = tok.encode(text)
        assert sum(lengths[i] for i in ids) == len(text.encode("utf-8")), name


def test_token_bytes_match_decoded_tokens(tok):
    lengths = tok.token_bytes()
    # a single token may be a partial UTF-8 sequence; its byte length is what the byte-level alphabet spells
    vocab = tok.hf.get_vocab()
    from minipretrain.tokenizer import _bytes_to_unicode

    byte_of = {c: b for b, c in _bytes_to_unicode().items()}
    for token, idx in vocab.items():
        if idx >= len(SPECIAL_TOKENS):
            raw = bytes(byte_of[c] for c in token)
            assert lengths[idx] == len(raw) > 0


# --- save / load --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved_dir(tok, tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("tok") / "nested" / "tokenizer"
    tok.save(directory)
    return directory


def test_save_writes_both_files(saved_dir):
    assert (saved_dir / TOKENIZER_FILE).is_file()
    assert (saved_dir / TOKENIZER_CONFIG_FILE).is_file()
    config = json.loads((saved_dir / TOKENIZER_CONFIG_FILE).read_text())
    assert config["pad_token"] == PAD and config["bos_token"] == BOS and config["eos_token"] == EOS
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"


def test_load_same_fingerprint_and_ids(tok, saved_dir, samples):
    loaded = Tokenizer.load(saved_dir)
    assert loaded.fingerprint == tok.fingerprint
    assert len(tok.fingerprint) == 16
    assert loaded.vocab_size == tok.vocab_size
    assert loaded.token_bytes() == tok.token_bytes()
    for name, text in samples.items():
        assert loaded.encode(text) == tok.encode(text), name
        assert loaded.decode(loaded.encode(text)) == text, name
    again = Tokenizer.load(str(saved_dir))  # a str path works too
    assert again.fingerprint == tok.fingerprint


def test_fingerprint_differs_for_another_vocabulary(tok, corpus):
    other = train_tokenizer(corpus[:50], vocab_size=300, show_progress=False)
    assert other.fingerprint != tok.fingerprint


def test_transformers_loads_saved_tokenizer(tok, saved_dir, samples):
    transformers = pytest.importorskip("transformers")
    hf = transformers.PreTrainedTokenizerFast.from_pretrained(str(saved_dir))
    assert hf.pad_token == PAD and hf.bos_token == BOS and hf.eos_token == EOS
    assert (hf.pad_token_id, hf.bos_token_id, hf.eos_token_id) == (0, 1, 2)
    assert (hf.mask_token, hf.mask_token_id) == ("<|mask|>", 7)
    assert set(hf.all_special_tokens) == set(SPECIAL_TOKENS)
    assert len(hf) == tok.vocab_size
    for name, text in samples.items():
        ids = hf.encode(text, add_special_tokens=False)
        assert ids == tok.encode(text), name
        assert hf.decode(ids) == text, name
    # the tokenizer adds no bos/eos on its own
    assert hf("hello world")["input_ids"] == tok.encode("hello world")


def test_load_directory_without_tokenizer_json(tmp_path):
    with pytest.raises(UserError) as e:
        Tokenizer.load(tmp_path)
    assert TOKENIZER_FILE in str(e.value) and str(tmp_path) in str(e.value)
    with pytest.raises(UserError):
        Tokenizer.load(tmp_path / "does-not-exist")


def test_load_malformed_tokenizer_json(tmp_path):
    (tmp_path / TOKENIZER_FILE).write_text("{not json")
    with pytest.raises(UserError) as e:
        Tokenizer.load(tmp_path)
    assert TOKENIZER_FILE in str(e.value)


# --- CLI ----------------------------------------------------------------------------------------------------------


def test_cli_tokenizer_train(tmp_path, capsys):
    data = tmp_path / "small.txt"
    data.write_text(read_chars(shared("tinyshakespeare.txt"), 0, 60_000), encoding="utf-8")
    out = tmp_path / "tok"
    main(["tokenizer", "train", "--data", str(data), "--vocab-size", "400", "--out", str(out), "--no-progress"])
    assert (out / TOKENIZER_FILE).is_file() and (out / TOKENIZER_CONFIG_FILE).is_file()
    loaded = Tokenizer.load(out)
    assert loaded.vocab_size == 400
    assert loaded.decode(loaded.encode("To be, or not to be")) == "To be, or not to be"
    stdout = capsys.readouterr().out
    assert loaded.fingerprint in stdout
    assert "documents" in stdout


def test_cli_tokenizer_train_shared_file_and_jsonl_field(tmp_path, capsys):
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("".join(json.dumps({"body": t}) + "\n" for t in ["alpha beta", "gamma delta", "西游记"]),
                     encoding="utf-8")
    out = tmp_path / "tok"
    main(["tokenizer", "train", "--data", str(jsonl), str(shared("tinyshakespeare.txt")), "--text-field", "body",
          "--vocab-size", "300", "--out", str(out), "--no-progress"])
    loaded = Tokenizer.load(out)
    assert loaded.vocab_size == 300
    assert loaded.decode(loaded.encode("西游记")) == "西游记"


def test_cli_tokenizer_train_missing_data(tmp_path, capsys):
    out = tmp_path / "tok"
    with pytest.raises(SystemExit) as e:
        main(["tokenizer", "train", "--data", str(tmp_path / "nope.txt"), "--vocab-size", "300", "--out", str(out),
              "--no-progress"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "nope.txt" in err
    assert not (out / TOKENIZER_FILE).exists()


def test_cli_tokenizer_train_no_documents(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    out = tmp_path / "tok"
    with pytest.raises(SystemExit) as e:
        main(["tokenizer", "train", "--data", str(empty), "--vocab-size", "300", "--out", str(out), "--no-progress"])
    assert e.value.code == 2
    assert capsys.readouterr().err.startswith("error: ")
    assert not (out / TOKENIZER_FILE).exists()
