"""Data: readers (JSONL, text, directories, globs, builtin), bad input, batch layouts, the batch iterator,
validation splits, and data errors surfacing from `train()`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from minipretrain.config import load_config
from minipretrain.data.batches import (
    IGNORE,
    BatchIterator,
    PackedRows,
    PaddedRows,
    TokenizedCorpus,
    make_rows,
    split_documents,
    tokenize_documents,
)
from minipretrain.data.sources import ReadStats, iter_documents, python_docs, read_texts, resolve_files
from minipretrain.errors import DataError, UserError

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def shared(name: str) -> Path:
    path = SHARED / name
    if not path.is_file():
        pytest.skip(f"shared corpus {path} not present")
    return path


def read(spec, **kwargs) -> tuple[list[str], ReadStats]:
    stats = ReadStats()
    docs = list(iter_documents(str(spec), stats=stats, **kwargs))
    return docs, stats


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


# --- readers ----------------------------------------------------------------------------------------------------


def test_jsonl_default_text_field(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "first doc", "source": "a"}, {"text": "第二个文档 🤖", "x": 1}])
    docs, stats = read(path)
    assert docs == ["first doc", "第二个文档 🤖"]
    assert stats.documents == 2
    assert stats.bytes == sum(len(d.encode("utf-8")) for d in docs)
    assert stats.empty == 0 and not stats.skipped


def test_jsonl_configurable_text_field(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"content": "alpha", "text": "not me"}, {"content": "beta"}])
    docs, _ = read(path, text_field="content")
    assert docs == ["alpha", "beta"]


def test_jsonl_blank_lines_and_crlf_are_fine(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"text": "one"}\r\n\r\n   \n{"text": "two\\r\\nlines"}\r\n')
    docs, stats = read(path)
    assert docs == ["one", "two\r\nlines"]  # JSON string content is kept verbatim
    assert stats.documents == 2 and not stats.skipped


def test_json_suffix_is_read_as_jsonl(tmp_path):
    path = write_jsonl(tmp_path / "d.json", [{"text": "a"}, {"text": "b"}])
    assert read(path)[0] == ["a", "b"]


def test_text_file_split_on_blank_lines(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("para one line 1\npara one line 2\n\n\n\npara two\n   \t \npara three\nend", encoding="utf-8")
    docs, stats = read(path)
    assert docs == ["para one line 1\npara one line 2", "para two", "para three\nend"]
    assert stats.documents == 3 and stats.empty == 0


def test_text_file_crlf(tmp_path):
    path = tmp_path / "t.txt"
    path.write_bytes("　　第一段，第一行\r\n第一段，第二行\r\n\r\n\r\n　　第二段\r\n\u3000\u3000\r\nthird\r\n".encode("utf-8"))
    docs, _ = read(path)
    assert docs == ["　　第一段，第一行\n第一段，第二行", "　　第二段", "third"]
    assert not any("\r" in d for d in docs)


def test_text_file_leading_blank_lines_and_no_final_newline(tmp_path):
    path = tmp_path / "t.md"
    path.write_text("\n\n# Title\n\nbody", encoding="utf-8")
    assert read(path)[0] == ["# Title", "body"]


def test_shared_chinese_novel_crlf():
    docs, stats = read(shared("zh-novel-xiyouji.txt"))
    assert stats.documents == len(docs) > 1000
    assert all(d.strip() for d in docs)
    assert not any("\r" in d for d in docs)
    assert not any("\n\n" in d for d in docs)
    assert docs[0] == "《西游记》吴承恩（明）"
    assert sum(len(d) for d in docs) > 500_000


def test_shared_jsonl_text_field_and_other_field():
    path = shared("sample_pretrain.jsonl")
    docs, stats = read(path)
    assert stats.documents == len(docs) == 3489
    assert not stats.skipped
    sources, _ = read(path, text_field="source")
    assert len(sources) == len(docs)
    assert set(sources) != set(docs[:10])  # a different field gives different documents
    paths, _ = read(shared("cpython-3.11.7-stdlib-code.jsonl"), text_field="path")
    assert len(paths) == 638 and all(p.endswith(".py") for p in paths)


def test_directory_reads_known_suffixes_recursively(tmp_path):
    (tmp_path / "sub").mkdir()
    write_jsonl(tmp_path / "a.jsonl", [{"text": "from jsonl"}])
    (tmp_path / "sub" / "b.txt").write_text("from txt 1\n\nfrom txt 2\n")
    (tmp_path / "c.md").write_text("from md\n")
    (tmp_path / "d.csv").write_text("ignored,csv\n")
    (tmp_path / "e.py").write_text("ignored = True\n")
    files = resolve_files(str(tmp_path))
    assert [f.name for f in files] == ["a.jsonl", "c.md", "b.txt"]  # sorted by path
    docs, stats = read(tmp_path)
    assert docs == ["from jsonl", "from md", "from txt 1", "from txt 2"]
    assert stats.documents == 4


def test_glob(tmp_path):
    for i in range(3):
        (tmp_path / f"part{i}.txt").write_text(f"doc {i}\n")
    write_jsonl(tmp_path / "other.jsonl", [{"text": "not matched"}])
    docs, _ = read(tmp_path / "part*.txt")
    assert docs == ["doc 0", "doc 1", "doc 2"]
    (tmp_path / "deep" / "er").mkdir(parents=True)
    (tmp_path / "deep" / "er" / "x.txt").write_text("deep doc\n")
    docs, _ = read(str(tmp_path) + "/**/*.txt")
    assert "deep doc" in docs and "doc 0" in docs and "not matched" not in docs


def test_glob_matching_nothing(tmp_path):
    with pytest.raises(DataError) as e:
        read(tmp_path / "*.jsonl")
    assert "*.jsonl" in str(e.value)


def test_empty_directory(tmp_path):
    (tmp_path / "only.csv").write_text("x\n")
    with pytest.raises(DataError) as e:
        read(tmp_path)
    assert str(tmp_path) in str(e.value)


@pytest.fixture(scope="module")
def python_docs_list():
    return list(python_docs())


def test_builtin_python_docs(python_docs_list):
    docs = python_docs_list
    assert len(docs) > 300
    assert all(isinstance(d, str) and d.strip() for d in docs)
    assert sum(len(d) for d in docs) > 1_000_000
    assert any("json" in d[:200] for d in docs)  # module docstrings carry the module name as a title
    assert len(set(docs)) > 0.9 * len(docs)


def test_builtin_python_docs_through_iter_documents(python_docs_list, monkeypatch):
    # the spec goes through python_docs(); feed it the cached result so this stays fast
    import minipretrain.data.sources as sources

    monkeypatch.setattr(sources, "python_docs", lambda: iter(python_docs_list))
    docs, stats = read("builtin:python-docs")
    assert docs == [d for d in python_docs_list if d.strip()]
    assert stats.documents == len(docs)


def test_unknown_builtin():
    with pytest.raises(DataError) as e:
        read("builtin:wikipedia")
    assert "builtin:wikipedia" in str(e.value) and "builtin:python-docs" in str(e.value)


def test_missing_file(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(DataError) as e:
        read(missing)
    assert str(missing) in str(e.value)
    with pytest.raises(DataError):
        read_texts(str(missing))


# --- bad input ------------------------------------------------------------------------------------------------------

GOOD1 = b'{"text": "good one"}\n'
GOOD2 = b'{"text": "good two"}\n'
BAD_JSONL = {
    "malformed JSON": b'{"text": "unterminated\n',
    "missing text field": b'{"body": "wrong field"}\n',
    "non-string text": b'{"text": 42}\n',
    "invalid UTF-8": b'{"text": "bad \xff\xfe byte"}\n',
}


@pytest.mark.parametrize("reason", list(BAD_JSONL))
def test_bad_jsonl_line_names_file_and_line(tmp_path, reason):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(GOOD1 + b"\n" + BAD_JSONL[reason] + GOOD2)  # the bad record is on line 3
    with pytest.raises(DataError) as e:
        read(path)
    message = str(e.value)
    assert f"{path}:3" in message
    assert "skip_bad_lines" in message


@pytest.mark.parametrize("reason", list(BAD_JSONL))
def test_bad_jsonl_line_skipped_and_counted(tmp_path, reason):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(GOOD1 + BAD_JSONL[reason] + BAD_JSONL[reason] + GOOD2)
    docs, stats = read(path, skip_bad_lines=True)
    assert docs == ["good one", "good two"]
    assert stats.skipped == {reason: 2}
    assert stats.documents == 2
    assert reason in stats.summary()


def test_jsonl_non_object_record_is_missing_field(tmp_path):
    path = tmp_path / "list.jsonl"
    path.write_bytes(b'["text", "in a list"]\n')
    with pytest.raises(DataError) as e:
        read(path)
    assert f"{path}:1" in str(e.value) and "text" in str(e.value)


def test_jsonl_wrong_text_field_message_names_field(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "x"}])
    with pytest.raises(DataError) as e:
        read(path, text_field="content")
    assert "content" in str(e.value) and f"{path}:1" in str(e.value)


def test_jsonl_mixed_bad_lines_counted_by_reason(tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(GOOD1 + b"".join(BAD_JSONL.values()) + BAD_JSONL["non-string text"] + GOOD2)
    docs, stats = read(path, skip_bad_lines=True)
    assert docs == ["good one", "good two"]
    assert stats.skipped == {"malformed JSON": 1, "missing text field": 1, "non-string text": 2, "invalid UTF-8": 1}


def test_invalid_utf8_in_text_file(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_bytes(b"line one\nline two\n\nline \xc3\x28 four\nline five\n")
    with pytest.raises(DataError) as e:
        read(path)
    assert f"{path}:4" in str(e.value)
    assert "UTF-8" in str(e.value)
    docs, stats = read(path, skip_bad_lines=True)
    assert docs == ["line one\nline two", "line five"]
    assert stats.skipped == {"invalid UTF-8": 1}


def test_empty_documents_skipped_and_counted(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": ""}, {"text": "real"}, {"text": "  \n\t "}, {"text": "also"}])
    docs, stats = read(path)
    assert docs == ["real", "also"]
    assert stats.empty == 2 and stats.documents == 2
    assert "2 empty" in stats.summary()


def test_read_texts_empty_dataset(tmp_path):
    path = write_jsonl(tmp_path / "empty.jsonl", [{"text": ""}, {"text": "   "}])
    with pytest.raises(DataError) as e:
        read_texts(str(path))
    assert str(path) in str(e.value)
    (tmp_path / "blank.txt").write_text("\n\n  \n")
    with pytest.raises(DataError):
        read_texts(str(tmp_path / "blank.txt"))
    bad_only = tmp_path / "bad_only.jsonl"
    bad_only.write_bytes(BAD_JSONL["malformed JSON"])
    with pytest.raises(DataError):
        read_texts(str(bad_only), skip_bad_lines=True)


def test_read_texts_returns_texts_and_stats(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "a"}, {"text": ""}, {"text": "b"}])
    texts, stats = read_texts(str(path))
    assert texts == ["a", "b"] and stats.documents == 2 and stats.empty == 1


# --- tokenized corpus and row layouts ----------------------------------------------------------------------------

EOS, BOS, PAD = 2, 1, 0


def make_corpus(docs: list[list[int]]) -> TokenizedCorpus:
    tokens = np.asarray([t for d in docs for t in d], dtype=np.uint16)
    offsets = np.concatenate([[0], np.cumsum([len(d) for d in docs])]).astype(np.int64)
    return TokenizedCorpus(tokens, offsets, np.asarray([len(d) for d in docs], dtype=np.int64))


def random_docs(n: int, seed: int = 0, max_len: int = 40) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, 300, size=rng.integers(1, max_len)).tolist() for _ in range(n)]


class CharTokenizer:
    """A stand-in with the interface tokenize_documents uses: one token per character."""

    vocab_size = 1000
    pad_id, bos_id, eos_id = PAD, BOS, EOS

    def encode_batch(self, texts):
        return [[3 + (ord(c) % 997) for c in t] for t in texts]


def test_tokenize_documents_offsets_and_bytes():
    texts = ["abc", "", "héllo", "西游"]
    corpus = tokenize_documents(texts, CharTokenizer(), chunk=2, show_progress=False)
    assert corpus.num_documents == 4
    assert corpus.offsets.tolist() == [0, 3, 3, 8, 10]
    assert corpus.document(2).tolist() == [3 + ord(c) % 997 for c in "héllo"]
    assert corpus.doc_bytes.tolist() == [len(t.encode("utf-8")) for t in texts]
    assert corpus.num_bytes == sum(len(t.encode("utf-8")) for t in texts)
    assert corpus.tokens.dtype == np.uint16


def test_packed_stream_is_docs_joined_by_eos():
    docs = [[5, 6, 7], [8], [9, 10, 11, 12], [13, 14]]
    rows = PackedRows(make_corpus(docs), seq_len=4, eos_id=EOS, pad_id=PAD)
    assert rows.stream.tolist() == [5, 6, 7, EOS, 8, EOS, 9, 10, 11, 12, EOS, 13, 14, EOS]
    assert len(rows) == 14 // 4
    inputs, labels = rows.get(np.arange(len(rows)))
    assert inputs.tolist() == [[5, 6, 7, EOS], [8, EOS, 9, 10], [11, 12, EOS, 13]]
    assert torch.equal(inputs, labels)


@pytest.mark.parametrize("seq_len", [1, 7, 16, 64])
def test_packed_training_rows_have_no_padding(seq_len):
    docs = random_docs(50, seed=seq_len)
    corpus = make_corpus(docs)
    rows = PackedRows(corpus, seq_len, eos_id=EOS, pad_id=PAD)
    expected_stream = [t for d in docs for t in d + [EOS]]
    assert rows.stream.tolist() == expected_stream
    assert len(rows) == len(expected_stream) // seq_len
    inputs, labels = rows.get(np.arange(len(rows)))
    assert inputs.shape == labels.shape == (len(rows), seq_len)
    assert inputs.dtype == labels.dtype == torch.int64
    assert (labels != IGNORE).all()
    assert (inputs != PAD).all()
    assert torch.equal(inputs, labels)
    assert inputs.flatten().tolist() == expected_stream[: len(rows) * seq_len]
    assert int((inputs == EOS).sum()) == sum(1 for t in expected_stream[: len(rows) * seq_len] if t == EOS)


def test_packed_eval_rows_keep_partial_row():
    docs = random_docs(20, seed=3)
    stream = [t for d in docs for t in d + [EOS]]
    seq_len = 16
    assert len(stream) % seq_len != 0
    rows = PackedRows(make_corpus(docs), seq_len, eos_id=EOS, pad_id=PAD, keep_partial=True)
    assert len(rows) == -(-len(stream) // seq_len)
    inputs, labels = rows.get(np.arange(len(rows)))
    scored = labels != IGNORE
    assert int(scored.sum()) == len(stream)  # every token scored once
    assert labels[scored].tolist() == stream
    assert (inputs[~scored] == PAD).all()
    assert scored[:-1].all()  # only the final row is padded
    tail = len(stream) % seq_len
    assert scored[-1, :tail].all() and not scored[-1, tail:].any()


def test_padded_rows_bos_doc_eos_truncated():
    docs = [[5, 6, 7], [8] * 20, [], [9, 10, 11, 12, 13, 14]]
    seq_len = 8
    rows = PaddedRows(make_corpus(docs), seq_len, bos_id=BOS, eos_id=EOS, pad_id=PAD)
    assert len(rows) == len(docs)
    inputs, labels = rows.get(np.arange(len(docs)))
    assert inputs.shape == (len(docs), seq_len)
    for r, doc in enumerate(docs):
        row = ([BOS] + doc + [EOS])[:seq_len]
        n = len(row)
        assert inputs[r, :n].tolist() == row
        assert labels[r, :n].tolist() == row
        assert (inputs[r, n:] == PAD).all()
        assert (labels[r, n:] == IGNORE).all()
    assert inputs[1].tolist() == [BOS] + [8] * 7  # truncated: no eos
    assert inputs[0].tolist() == [BOS, 5, 6, 7, EOS, PAD, PAD, PAD]
    assert labels[0].tolist() == [BOS, 5, 6, 7, EOS, IGNORE, IGNORE, IGNORE]


def test_padded_rows_labels_ignore_exactly_the_padding():
    docs = random_docs(30, seed=5, max_len=30)
    seq_len = 20
    rows = PaddedRows(make_corpus(docs), seq_len, bos_id=BOS, eos_id=EOS, pad_id=PAD)
    inputs, labels = rows.get(np.arange(len(rows)))
    lengths = [min(len(d) + 2, seq_len) for d in docs]
    assert (labels != IGNORE).sum(dim=1).tolist() == lengths
    assert ((labels == IGNORE) == (inputs == PAD)).all()  # token ids >= 3, so pad appears only as padding


def test_make_rows_layouts():
    corpus = make_corpus(random_docs(10))
    tok = CharTokenizer()
    assert isinstance(make_rows(corpus, "packed", 8, tok), PackedRows)
    assert isinstance(make_rows(corpus, "padded", 8, tok), PaddedRows)
    train_rows = make_rows(corpus, "packed", 8, tok)
    eval_rows = make_rows(corpus, "packed", 8, tok, for_eval=True)
    assert len(eval_rows) >= len(train_rows)


# --- batch iterator -----------------------------------------------------------------------------------------------


class IndexRows:
    """Rows whose content is their own index, to see exactly which rows a batch holds."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self):
        return self.n

    def get(self, indices):
        t = torch.as_tensor(indices, dtype=torch.int64)[:, None]
        return t, t


def take(it: BatchIterator, batches: int) -> list[list[int]]:
    return [next(it)[0][:, 0].tolist() for _ in range(batches)]


def test_batch_iterator_deterministic_for_a_seed():
    a = take(BatchIterator(IndexRows(37), 4, seed=7), 30)
    b = take(BatchIterator(IndexRows(37), 4, seed=7), 30)
    c = take(BatchIterator(IndexRows(37), 4, seed=8), 30)
    assert a == b
    assert a != c


@pytest.mark.parametrize("n, batch_size", [(40, 4), (37, 4), (5, 8), (1, 3), (10, 1)])
def test_batch_iterator_covers_every_row_once_per_epoch(n, batch_size):
    it = BatchIterator(IndexRows(n), batch_size, seed=1)
    epochs = 4
    batches = take(it, -(-epochs * n // batch_size))
    assert all(len(b) == batch_size for b in batches)
    flat = [i for batch in batches for i in batch]
    orders = [flat[e * n : (e + 1) * n] for e in range(epochs)]
    for order in orders:
        assert sorted(order) == list(range(n))
    if n > 3:
        assert len({tuple(o) for o in orders}) == epochs  # each epoch a new order
        assert orders[0] != list(range(n))  # shuffled


def test_batch_iterator_epoch_counter():
    it = BatchIterator(IndexRows(10), 5, seed=0)
    take(it, 1)
    assert it.state_dict()["epoch"] == 0 and it.state_dict()["index"] == 5
    take(it, 1)
    assert it.state_dict()["epoch"] == 1 and it.state_dict()["index"] == 0
    take(it, 3)
    assert it.state_dict()["epoch"] == 2 and it.state_dict()["index"] == 5


def test_batch_iterator_without_shuffle():
    it = BatchIterator(IndexRows(6), 4, seed=0, shuffle=False)
    assert take(it, 3) == [[0, 1, 2, 3], [4, 5, 0, 1], [2, 3, 4, 5]]


@pytest.mark.parametrize("consumed", [0, 1, 9, 10, 23])
def test_batch_iterator_resume_gives_same_batches(consumed):
    rows = IndexRows(37)
    reference = BatchIterator(rows, 4, seed=3)
    take(reference, consumed)
    state = reference.state_dict()
    state = json.loads(json.dumps(state))  # survives a JSON round trip (checkpoints store it)
    expected = take(reference, 25)
    resumed = BatchIterator(IndexRows(37), 4, seed=3)
    take(resumed, 2)  # its own position is overwritten
    resumed.load_state_dict(state)
    assert take(resumed, 25) == expected


def test_batch_iterator_resume_real_rows():
    rows = PackedRows(make_corpus(random_docs(40, seed=9)), 8, eos_id=EOS)
    a = BatchIterator(rows, 3, seed=11)
    for _ in range(7):
        next(a)
    state = a.state_dict()
    b = BatchIterator(rows, 3, seed=11)
    b.load_state_dict(state)
    for _ in range(10):
        (xa, ya), (xb, yb) = next(a), next(b)
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_batch_iterator_load_state_with_different_rows():
    state = BatchIterator(IndexRows(37), 4, seed=3).state_dict()
    with pytest.raises(DataError) as e:
        BatchIterator(IndexRows(38), 4, seed=3).load_state_dict(state)
    assert "37" in str(e.value) and "38" in str(e.value)
    with pytest.raises(DataError):
        BatchIterator(IndexRows(37), 4, seed=4).load_state_dict(state)


def test_batch_iterator_no_rows():
    with pytest.raises(DataError):
        BatchIterator(IndexRows(0), 4, seed=0)


# --- validation split ------------------------------------------------------------------------------------------------


def test_split_documents_deterministic_and_disjoint():
    texts = [f"document number {i}" for i in range(200)]
    train1, val1 = split_documents(texts, 0.1)
    train2, val2 = split_documents(list(texts), 0.1)
    assert (train1, val1) == (train2, val2)
    assert len(val1) == 20 and len(train1) == 180
    assert not set(train1) & set(val1)
    assert sorted(train1 + val1) == sorted(texts)
    assert train1 == [t for t in texts if t in set(train1)]  # order kept
    assert val1 != texts[-20:] and val1 != texts[:20]  # held out at random, not the tail


def test_split_documents_holds_out_at_least_one():
    texts = ["a", "b", "c"]
    train, val = split_documents(texts, 0.001)
    assert len(val) == 1 and len(train) == 2


@pytest.mark.parametrize("texts, fraction", [(["only one"], 0.01), (["only one"], 0.5), (["a", "b"], 0.9)])
def test_split_documents_too_few(texts, fraction):
    with pytest.raises(DataError) as e:
        split_documents(texts, fraction)
    assert "val_fraction" in str(e.value)


# --- data errors from train() -------------------------------------------------------------------------------------

TINY = [
    "model.hidden_size=32", "model.num_hidden_layers=2", "model.num_attention_heads=2",
    "model.num_key_value_heads=1", "model.vocab_size=300", "model.max_position_embeddings=64",
    "train.batch_size=2", "train.seq_len=16", "train.max_steps=2", "train.eval_batches=1",
    "train.device=cpu", "train.eval_every=0", "train.save_every=0",
]


def test_train_seq_len_longer_than_data(tmp_path):
    from minipretrain.train.loop import train

    data = tmp_path / "few.txt"
    data.write_text("just a few words here\n")
    cfg = load_config(None, TINY + [f"data.path={data}", "train.seq_len=60", "data.val_fraction=0"])
    run_dir = tmp_path / "run"
    with pytest.raises(UserError) as e:
        train(cfg, run_dir, show_progress=False)
    assert "train.seq_len" in str(e.value)
    assert not (run_dir / "metrics.jsonl").exists()
    assert not (run_dir / "checkpoints").exists()
    assert not (run_dir / "summary.json").exists()


def test_train_missing_data_file(tmp_path):
    from minipretrain.train.loop import train

    missing = tmp_path / "missing.jsonl"
    cfg = load_config(None, TINY + [f"data.path={missing}"])
    with pytest.raises(DataError) as e:
        train(cfg, tmp_path / "run", show_progress=False)
    assert str(missing) in str(e.value)


def test_train_single_document_with_val_fraction(tmp_path):
    from minipretrain.train.loop import train

    data = tmp_path / "one.txt"
    data.write_text("a single paragraph of text that is the whole dataset\n")
    cfg = load_config(None, TINY + [f"data.path={data}", "data.val_fraction=0.1"])
    with pytest.raises(DataError) as e:
        train(cfg, tmp_path / "run", show_progress=False)
    assert "val_fraction" in str(e.value)
