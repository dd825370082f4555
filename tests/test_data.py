"""Data sources: readers (JSONL, text, Parquet, directories, globs, builtin), bad input, and data errors
surfacing from `train()`. Shards, rows and the sampler are in test_shards.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from minipretrain.config import load_config
from minipretrain.data.sources import ReadStats, iter_documents, python_docs, resolve_files
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
    text = "　　第一段，第一行\r\n第一段，第二行\r\n\r\n\r\n　　第二段\r\n\u3000\u3000\r\nthird\r\n"
    path.write_bytes(text.encode("utf-8"))
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


def test_prepare_of_an_empty_dataset_is_an_error(tmp_path):
    from minipretrain.data.shards import PrepareOptions, prepare

    tokenizer = _small_tokenizer()
    path = write_jsonl(tmp_path / "empty.jsonl", [{"text": ""}, {"text": "   "}])
    with pytest.raises(DataError) as e:
        prepare([str(path)], tokenizer, tmp_path / "out", PrepareOptions(workers=1), show_progress=False)
    assert str(path) in str(e.value)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()
    bad_only = tmp_path / "bad_only.jsonl"
    bad_only.write_bytes(BAD_JSONL["malformed JSON"])
    with pytest.raises(DataError):
        prepare([str(bad_only)], tokenizer, tmp_path / "out", PrepareOptions(skip_bad_lines=True, workers=1),
                show_progress=False)


def _small_tokenizer():
    from minipretrain.tokenizer import train_tokenizer

    return train_tokenizer(["abc def"], 270, show_progress=False)


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
