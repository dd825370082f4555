"""Prepared data: the shard format, `prepare` (streaming, workers, no-op re-runs, refusals, corruption), rows read
from memory maps (packed, document-masked, padded), and the mixture sampler (shares, cycling, O(1) resume,
independence from the number of data-parallel ranks)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_cli_errors, shared_file, tiny_config

from minipretrain.data import shards as shards_mod
from minipretrain.data.batches import IGNORE, MixtureSampler, PackedRows, PaddedRows, make_rows
from minipretrain.data.shards import (
    HEADER_SIZE,
    PreparedData,
    PrepareOptions,
    ShardWriter,
    TokenShards,
    is_held_out,
    prepare,
)
from minipretrain.data.sources import iter_documents
from minipretrain.errors import DataError
from minipretrain.tokenizer import Tokenizer, train_tokenizer
from minipretrain.train.loop import train
from minipretrain.train.metrics import read_metrics


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir) -> Tokenizer:
    return Tokenizer.load(tokenizer_dir)


def write_jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts), encoding="utf-8")
    return path


def sample_texts(n: int = 200) -> list[str]:
    docs = iter_documents(str(shared_file("sample_pretrain.jsonl")))
    return [next(docs) for _ in range(n)]


def opts(**kw) -> PrepareOptions:
    kw.setdefault("workers", 1)
    return PrepareOptions(**kw)


def write_shards(directory: Path, docs: list[list[int]], shard_tokens: int = 10**9, vocab: int = 320,
                 split: str = "train") -> TokenShards:
    """Shards written by the real writer from given token lists (each gets eos = 2 appended)."""
    directory.mkdir(parents=True, exist_ok=True)
    writer = ShardWriter(directory, split, vocab, "f" * 16, shard_tokens)
    for doc in docs:
        tokens = np.asarray(doc + [2], dtype=np.int64)
        writer.add(tokens, np.asarray([len(tokens)]), np.asarray([len(doc)]))
    info = writer.finish()
    return TokenShards(directory, info["shards"], shards_mod.token_dtype(vocab))


def random_docs(n: int, seed: int = 0, max_len: int = 40) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, 300, size=rng.integers(1, max_len)).tolist() for _ in range(n)]


# --- the format ------------------------------------------------------------------------------------------------


def test_prepare_recovers_every_document_exactly(tmp_path, tokenizer):
    texts = sample_texts(120)
    src = write_jsonl(tmp_path / "docs.jsonl", texts)
    manifest = prepare([str(src)], tokenizer, tmp_path / "out", opts(val_fraction=0.1), show_progress=False)
    data = PreparedData(tmp_path / "out", tokenizer.fingerprint)
    held = is_held_out(np.arange(len(texts)), 0.1)
    train, val = data.split("train"), data.split("val")
    assert train.num_documents == int((~held).sum()) and val.num_documents == int(held.sum()) == 12
    for stream, expected in ((train, [t for t, h in zip(texts, held, strict=True) if not h]),
                             (val, [t for t, h in zip(texts, held, strict=True) if h])):
        for i, text in enumerate(expected):
            doc = stream.document(i)
            assert doc[-1] == tokenizer.eos_id
            assert tokenizer.decode(doc[:-1]) == text
            assert doc[:-1].tolist() == tokenizer.encode(text)
    s = manifest["summary"]
    assert s["documents"] == 120 and s["tokens"] == train.num_tokens + val.num_tokens
    assert s["bytes"] == sum(len(t.encode()) for t in texts)
    assert manifest["dtype"] == "uint16" and (tmp_path / "out" / "tokenizer" / "tokenizer.json").is_file()


def test_shard_header_fields(tmp_path, tokenizer):
    src = write_jsonl(tmp_path / "docs.jsonl", sample_texts(20))
    manifest = prepare([str(src)], tokenizer, tmp_path / "out", opts(), show_progress=False)
    shard = manifest["splits"]["train"]["shards"][0]
    raw = (tmp_path / "out" / shard["file"]).read_bytes()
    header = raw[: shards_mod._HEADER.size]
    magic, version, itemsize, vocab, tokens, docs, fingerprint = shards_mod._HEADER.unpack(header)
    assert (magic, version, itemsize, vocab) == (b"MPTOKENS", 1, 2, tokenizer.vocab_size)
    assert (tokens, docs) == (shard["tokens"], 20)
    assert fingerprint.rstrip(b"\0").decode() == tokenizer.fingerprint
    assert len(raw) == HEADER_SIZE + -(-tokens * 2 // 8) * 8 + 8 * docs


def test_large_vocabulary_uses_uint32(tmp_path):
    docs = [[70_000, 3, 65_999], [5]]
    stream = write_shards(tmp_path, docs, vocab=80_000)
    assert stream.read(0, 6).tolist() == [70_000, 3, 65_999, 2, 5, 2]
    assert shards_mod.token_dtype(65_536) == np.uint16 and shards_mod.token_dtype(65_537) == np.uint32


def test_rows_span_shards_and_document_starts_cross_them(tmp_path):
    docs = random_docs(60, seed=1)
    stream = write_shards(tmp_path, docs, shard_tokens=100)
    assert len(list(tmp_path.glob("train_*.bin"))) > 5
    flat = np.concatenate([np.asarray(d + [2]) for d in docs])
    assert stream.num_tokens == len(flat) and stream.num_documents == 60
    for start, stop in [(0, 7), (95, 230), (0, len(flat)), (len(flat) - 3, len(flat))]:
        assert stream.read(start, stop).tolist() == flat[start:stop].tolist()
    starts = np.concatenate([[0], np.cumsum([len(d) + 1 for d in docs])[:-1]])
    rng = np.random.default_rng(0)
    ranges = [(50, 400), (0, len(flat)), (100, 100)] + [tuple(sorted(rng.integers(0, len(flat), 2))) for _ in range(50)]
    for a, b in ranges:
        assert stream.document_starts(a, b).tolist() == [s for s in starts if a <= s < b]
    for i in (0, 17, 59):
        assert stream.document(i).tolist() == docs[i] + [2]


def test_held_out_documents_are_evenly_spaced():
    held = is_held_out(np.arange(1000), 0.01)
    assert held.sum() == 10
    assert np.diff(np.flatnonzero(held)).tolist() == [100] * 9
    assert not is_held_out(np.arange(100), 0.0).any()
    assert [bool(is_held_out(i, 0.25)) for i in range(8)] == [False, True, False, False, False, True, False, False]


# --- preparation ------------------------------------------------------------------------------------------------


def test_workers_write_the_same_shards_as_one_process(tmp_path, tokenizer):
    src = write_jsonl(tmp_path / "docs.jsonl", sample_texts(300))
    one = prepare([str(src)], tokenizer, tmp_path / "one", opts(val_fraction=0.05), show_progress=False)
    two = prepare([str(src)], tokenizer, tmp_path / "two", opts(val_fraction=0.05, workers=2), show_progress=False)
    assert shards_mod.data_fingerprint(one) == shards_mod.data_fingerprint(two)
    assert two["summary"]["workers"] == 2


def test_workers_keep_a_bounded_number_of_chunks_in_flight(tokenizer):
    pulled = []

    def chunks():
        for i in range(100):
            pulled.append(i)
            yield [f"document {i}"]

    encoded = shards_mod._encoded_chunks(chunks(), tokenizer, workers=2)
    next(encoded)
    assert len(pulled) <= 2 * 2 + 1  # never the whole input, whatever its size
    assert sum(1 for _ in encoded) == 99


def test_rerun_is_a_noop_and_other_tokenizer_is_refused(tmp_path, tokenizer):
    src = write_jsonl(tmp_path / "docs.jsonl", sample_texts(30))
    out = tmp_path / "out"
    prepare([str(src)], tokenizer, out, opts(), show_progress=False)
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    messages = []
    prepare([str(src)], tokenizer, out, opts(), show_progress=False, log=messages.append)
    assert "up to date" in messages[0]
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == mtimes
    other = train_tokenizer(sample_texts(30), 300, show_progress=False)
    with pytest.raises(DataError, match="--overwrite"):
        prepare([str(src)], other, out, opts(), show_progress=False)
    with pytest.raises(DataError) as e:
        PreparedData(out, other.fingerprint)
    assert tokenizer.fingerprint in str(e.value) and other.fingerprint in str(e.value)
    prepare([str(src)], other, out, opts(), show_progress=False, overwrite=True)
    assert PreparedData(out, other.fingerprint).fingerprint == other.fingerprint


def test_changed_input_is_not_a_noop(tmp_path, tokenizer):
    src = write_jsonl(tmp_path / "docs.jsonl", sample_texts(10))
    prepare([str(src)], tokenizer, tmp_path / "out", opts(), show_progress=False)
    write_jsonl(src, sample_texts(12))
    with pytest.raises(DataError, match="other inputs"):
        prepare([str(src)], tokenizer, tmp_path / "out", opts(), show_progress=False)


@pytest.mark.parametrize("damage", ["truncate", "flip", "header", "missing"])
def test_truncated_or_corrupt_shards_are_detected(tmp_path, tokenizer, damage):
    src = write_jsonl(tmp_path / "docs.jsonl", sample_texts(40))
    manifest = prepare([str(src)], tokenizer, tmp_path / "out", opts(), show_progress=False)
    shard = tmp_path / "out" / manifest["splits"]["train"]["shards"][0]["file"]
    raw = bytearray(shard.read_bytes())
    if damage == "truncate":
        shard.write_bytes(raw[:-100])
    elif damage == "flip":
        raw[HEADER_SIZE + 50] ^= 0xFF
        shard.write_bytes(raw)
    elif damage == "header":
        raw[0:8] = b"XXXXXXXX"
        shard.write_bytes(raw)
    else:
        shard.unlink()
    expected = {"truncate": "truncated", "flip": "checksum", "header": "header", "missing": "missing"}[damage]
    with pytest.raises(DataError) as e:
        PreparedData(tmp_path / "out", tokenizer.fingerprint)
    assert str(shard) in str(e.value) and expected in str(e.value)


def test_bad_line_deep_in_a_large_file(tmp_path, tokenizer):
    path = tmp_path / "big.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for i in range(60_000):
            f.write('{"text": "line ' + str(i) + '"\n' if i == 54_320 else json.dumps({"text": f"line {i}"}) + "\n")
    with pytest.raises(DataError) as e:
        prepare([str(path)], tokenizer, tmp_path / "out", opts(), show_progress=False)
    assert f"{path}:54321" in str(e.value) and "malformed JSON" in str(e.value)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()
    manifest = prepare([str(path)], tokenizer, tmp_path / "out", opts(skip_bad_lines=True), show_progress=False)
    assert manifest["summary"]["skipped_lines"] == {"malformed JSON": 1}
    assert manifest["summary"]["documents"] == 59_999


def test_interrupted_preparation_leaves_nothing_that_looks_complete(tmp_path, tokenizer, monkeypatch):
    src = write_jsonl(tmp_path / "docs.jsonl", sample_texts(50))
    real_close = ShardWriter._close
    calls = []

    def crash_on_second_shard(self):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real_close(self)

    monkeypatch.setattr(ShardWriter, "_close", crash_on_second_shard)
    monkeypatch.setattr(shards_mod, "CHUNK_BYTES", 2000)
    with pytest.raises(KeyboardInterrupt):
        prepare([str(src)], tokenizer, tmp_path / "out", opts(shard_tokens=2000), show_progress=False)
    assert not (tmp_path / "out").exists()
    with pytest.raises(DataError, match="not a prepared dataset"):
        PreparedData(tmp_path / "out")


def test_missing_manifest_after_an_interruption_is_named(tmp_path):
    (tmp_path / "out.partial").mkdir()
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "train_00000.bin").write_bytes(b"x")
    with pytest.raises(DataError, match="interrupted"):
        PreparedData(tmp_path / "out")


def test_parquet_input(tmp_path, tokenizer):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    texts = sample_texts(25)
    table = pa.table({"content": texts + [None], "id": list(range(26))})
    pq.write_table(table, tmp_path / "docs.parquet", row_group_size=7)
    with pytest.raises(DataError, match="row 26"):
        prepare([str(tmp_path / "docs.parquet")], tokenizer, tmp_path / "out", opts(text_field="content"),
                show_progress=False)
    manifest = prepare([str(tmp_path / "docs.parquet")], tokenizer, tmp_path / "out",
                       opts(text_field="content", skip_bad_lines=True), show_progress=False)
    assert manifest["summary"]["skipped_lines"] == {"non-string text": 1}
    stream = PreparedData(tmp_path / "out").split("train")
    assert [tokenizer.decode(stream.document(i)) for i in range(25)] == texts
    with pytest.raises(DataError, match="no column 'text'"):
        prepare([str(tmp_path / "docs.parquet")], tokenizer, tmp_path / "x", opts(), show_progress=False)


# --- rows ---------------------------------------------------------------------------------------------------------


def test_packed_rows_are_slices_of_the_stream(tmp_path):
    docs = random_docs(30)
    stream = write_shards(tmp_path, docs, shard_tokens=64)
    flat = np.concatenate([np.asarray(d + [2]) for d in docs])
    rows = PackedRows(stream, 16)
    assert len(rows) == len(flat) // 16
    batch = rows.get([0, 3, len(rows) - 1])
    assert batch.doc_ids is None
    for r, i in enumerate([0, 3, len(rows) - 1]):
        assert batch.inputs[r].tolist() == flat[i * 16 : (i + 1) * 16].tolist()
        assert batch.labels[r].tolist() == batch.inputs[r].tolist()  # no padding, nothing ignored
    eval_rows = PackedRows(stream, 16, keep_partial=True)
    assert len(eval_rows) == -(-len(flat) // 16)
    last = eval_rows.get([len(eval_rows) - 1])
    tail = len(flat) % 16
    assert last.inputs[0, :tail].tolist() == flat[-tail:].tolist()
    assert (last.labels[0, tail:] == IGNORE).all() and (last.inputs[0, tail:] == 0).all()


def test_document_masked_rows_mark_documents_and_ignore_their_first_token(tmp_path):
    docs = [[10, 11, 12], [20, 21], [30, 31, 32, 33, 34, 35], [40]]
    stream = write_shards(tmp_path, docs, shard_tokens=5)  # documents also cross shard boundaries
    rows = PackedRows(stream, 8, document_mask=True)
    batch = rows.get([0, 1])
    # stream: 10 11 12 2 | 20 21 2 | 30 31 32 33 34 35 2 | 40 2
    assert batch.inputs[0].tolist() == [10, 11, 12, 2, 20, 21, 2, 30]
    assert batch.doc_ids[0].tolist() == [0, 0, 0, 0, 1, 1, 1, 2]
    assert batch.labels[0].tolist() == [10, 11, 12, 2, IGNORE, 21, 2, IGNORE]
    assert batch.inputs[1].tolist() == [31, 32, 33, 34, 35, 2, 40, 2]
    assert batch.doc_ids[1].tolist() == [0, 0, 0, 0, 0, 0, 1, 1]  # a row starting mid-document
    assert batch.labels[1].tolist() == [31, 32, 33, 34, 35, 2, IGNORE, 2]


def test_padded_rows_bos_doc_eos_truncated(tmp_path):
    docs = [[5, 6, 7], list(range(3, 30))]
    stream = write_shards(tmp_path, docs)
    rows = PaddedRows(stream, 8, bos_id=1, pad_id=0)
    batch = rows.get([0, 1])
    assert batch.inputs[0].tolist() == [1, 5, 6, 7, 2, 0, 0, 0]
    assert batch.labels[0].tolist() == [1, 5, 6, 7, 2, IGNORE, IGNORE, IGNORE]
    assert batch.inputs[1].tolist() == [1] + list(range(3, 10))


def test_make_rows_layouts(tmp_path, tokenizer):
    stream = write_shards(tmp_path, random_docs(10))
    assert isinstance(make_rows(stream, "padded", 8, tokenizer), PaddedRows)
    packed = make_rows(stream, "packed", 8, tokenizer, document_mask=True)
    assert isinstance(packed, PackedRows) and packed.document_mask


# --- the sampler --------------------------------------------------------------------------------------------------


class IndexRows:
    """Rows whose content is their own index (and a source tag), to see exactly what a sampler drew."""

    pad_id = 0

    def __init__(self, n: int, tag: int = 0, seq_len: int = 2):
        self.n, self.tag, self.seq_len = n, tag, seq_len

    def __len__(self):
        return self.n

    def example(self, i):
        row = np.asarray([self.tag, i])
        return row, row, None


def drawn(sampler: MixtureSampler, batches: int, batch_size: int, rank: int = 0, world: int = 1) -> list[tuple]:
    out = []
    for _ in range(batches):
        b = sampler.next_batch(batch_size, rank, world)
        out += [tuple(r) for r in b.inputs.tolist()]
    return out


def test_sampler_visits_every_row_once_per_epoch_with_a_new_shuffle():
    sampler = MixtureSampler([("a", IndexRows(37))], [1.0], seed=3)
    rows = drawn(sampler, 37, 2)
    first, second = rows[:37], rows[37:74]
    assert sorted(first) == [(0, i) for i in range(37)] and sorted(second) == sorted(first)
    assert first != second
    again = drawn(MixtureSampler([("a", IndexRows(37))], [1.0], seed=3), 37, 2)
    assert again == rows
    assert drawn(MixtureSampler([("a", IndexRows(37))], [1.0], seed=4), 37, 2) != rows


def test_mixture_shares_match_weights_and_small_sources_cycle():
    sources = [("big", IndexRows(1000, tag=0)), ("small", IndexRows(7, tag=1)), ("mid", IndexRows(50, tag=2))]
    sampler = MixtureSampler(sources, [0.6, 0.3, 0.1], seed=0)
    tags = np.asarray([tag for tag, _ in drawn(sampler, 1000, 3)])
    counts = np.stack([np.cumsum(tags == s) for s in range(3)], axis=1)  # rows from each source after k samples
    expected = np.outer(np.arange(1, len(tags) + 1), [0.6, 0.3, 0.1])
    assert np.abs(counts - expected).max() < 1  # every prefix within one row of its weight
    assert np.abs(counts[-1] / len(tags) - [0.6, 0.3, 0.1]).max() < 0.01
    assert sampler.drawn[1] == 900 > 7 * 100  # the 7-row source went through many epochs without stopping the run
    total = sampler.tokens_by_source()
    assert total == {"big": sampler.drawn[0] * 2, "small": sampler.drawn[1] * 2, "mid": sampler.drawn[2] * 2}


def test_resume_restores_the_sampler_in_constant_time():
    sources = lambda: [("a", IndexRows(37, 0)), ("b", IndexRows(11, 1))]  # noqa: E731
    reference = MixtureSampler(sources(), [0.7, 0.3], seed=5)
    drawn(reference, 23, 4)
    state = reference.state_dict()
    assert json.loads(json.dumps(state)) == state  # a few integers and names, no arrays
    after = drawn(reference, 30, 4)
    resumed = MixtureSampler(sources(), [0.7, 0.3], seed=5)
    resumed.load_state_dict(state)
    assert drawn(resumed, 30, 4) == after


def test_batches_do_not_depend_on_the_number_of_ranks():
    sources = lambda: [("a", IndexRows(50, 0)), ("b", IndexRows(9, 1))]  # noqa: E731
    single = drawn(MixtureSampler(sources(), [0.5, 0.5], seed=1), 12, 8)
    # two ranks with batch 4 each: their slices, interleaved step by step, are the single-rank sequence
    ranks = [MixtureSampler(sources(), [0.5, 0.5], seed=1) for _ in range(2)]
    together = []
    for _ in range(12):
        together += [tuple(r) for rank, s in enumerate(ranks) for r in s.next_batch(4, rank, 2).inputs.tolist()]
    assert together == single
    # train 5 steps on 2 ranks, resume on 1 rank: exactly the samples not seen yet, none twice
    state = None
    for rank, _s in enumerate(ranks):
        fresh = MixtureSampler(sources(), [0.5, 0.5], seed=1)
        for _ in range(5):
            fresh.next_batch(4, rank, 2)
        state = fresh.state_dict()
    resumed = MixtureSampler(sources(), [0.5, 0.5], seed=1)
    resumed.load_state_dict(state)
    assert drawn(resumed, 7, 8) == single[5 * 8 :]


def test_sampler_refuses_changed_data():
    state = MixtureSampler([("a", IndexRows(10))], [1.0], seed=0, fingerprints=["aaa"]).state_dict()
    for sources, seed, fps, what in [
        ([("a", IndexRows(11))], 0, ["aaa"], "num_rows"),
        ([("b", IndexRows(10))], 0, ["aaa"], "names"),
        ([("a", IndexRows(10))], 1, ["aaa"], "seed"),
        ([("a", IndexRows(10))], 0, ["bbb"], "fingerprints"),
    ]:
        with pytest.raises(DataError, match=what):
            MixtureSampler(sources, [1.0], seed=seed, fingerprints=fps).load_state_dict(state)


def test_sampler_rejects_empty_sources():
    with pytest.raises(DataError, match="'a' has no rows"):
        MixtureSampler([("a", IndexRows(0))], [1.0], seed=0)


# --- training on prepared data, mixtures, document masking, the CLI -------------------------------------------------


def _run(tmp_path, *overrides, name="run"):
    cfg = tiny_config(*overrides)
    return cfg, train(cfg, tmp_path / name, show_progress=False)


def _metrics(run_dir: Path) -> list[dict]:
    return read_metrics(run_dir / "metrics.jsonl")


def test_train_on_a_prepared_directory_uses_its_tokenizer(tmp_path, shakespeare, tokenizer):
    prepare([str(shakespeare)], tokenizer, tmp_path / "prepared", opts(val_fraction=0.05), show_progress=False)
    _, summary = _run(tmp_path, f"data.path={json.dumps(str(tmp_path / 'prepared'))}", "train.eval_every=3")
    assert summary["final_val_loss"] < summary["first_val_loss"]
    assert Tokenizer.load(Path(summary["checkpoint"])).fingerprint == tokenizer.fingerprint
    assert not (tmp_path / "run" / "data").exists()  # used in place, not copied


def test_train_refuses_shards_of_another_tokenizer(tmp_path, shakespeare, tokenizer):
    prepare([str(shakespeare)], tokenizer, tmp_path / "prepared", opts(), show_progress=False)
    other = train_tokenizer(iter_documents(str(shakespeare)), 300, show_progress=False)
    other.save(tmp_path / "other-tok")
    with pytest.raises(DataError) as e:
        _run(tmp_path, f"data.path={json.dumps(str(tmp_path / 'prepared'))}",
             f"data.tokenizer={json.dumps(str(tmp_path / 'other-tok'))}")
    assert tokenizer.fingerprint in str(e.value) and other.fingerprint in str(e.value)


def test_mixture_logs_per_source_tokens_and_validation(tmp_path, shakespeare, tokenizer_dir):
    zh = write_jsonl(tmp_path / "zh.jsonl", [t for t in sample_texts(200)])
    sources = (f'[{{path = {json.dumps(str(shakespeare))}, weight = 0.7}}, '
               f'{{path = {json.dumps(str(zh))}, weight = 0.3, name = "zh"}}]')
    _, _summary = _run(tmp_path, f"data.sources={sources}", f"data.tokenizer={json.dumps(str(tokenizer_dir))}",
                      "train.max_steps=25", "train.eval_every=10")
    records = _metrics(tmp_path / "run")
    last = [r for r in records if "tokens_by_source" in r][-1]
    by_source = last["tokens_by_source"]
    assert set(by_source) == {"shakespeare", "zh"} and sum(by_source.values()) == last["tokens"]
    assert abs(by_source["shakespeare"] / last["tokens"] - 0.7) < 0.01
    val = [r for r in records if "val_loss_by_source" in r]
    assert val and set(val[-1]["val_loss_by_source"]) == {"shakespeare", "zh"}
    by_source_val = val[-1]["val_loss_by_source"].values()
    assert min(by_source_val) <= val[-1]["val_loss"] <= max(by_source_val)


def test_document_masked_training_and_exact_resume(tmp_path, shakespeare, tokenizer_dir):
    common = [f"data.path={json.dumps(str(shakespeare))}", f"data.tokenizer={json.dumps(str(tokenizer_dir))}",
              "data.document_mask=true", "train.seq_len=64", "train.save_every=4", "train.eval_every=4"]
    cfg, _ = _run(tmp_path, *common, "train.max_steps=8", name="full")
    train(cfg, tmp_path / "resumed", resume=str(tmp_path / "full" / "checkpoints" / "step_000004"),
          show_progress=False)
    full = {r["step"]: r["loss"] for r in _metrics(tmp_path / "full") if "loss" in r}
    resumed = {r["step"]: r["loss"] for r in _metrics(tmp_path / "resumed") if "loss" in r}
    assert resumed == {step: full[step] for step in (5, 6, 7, 8)}


def test_train_names_shards_without_a_manifest(tmp_path, tokenizer_dir):
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "train_00000.bin").write_bytes(b"x")
    with pytest.raises(DataError, match=r"no manifest.json: its preparation was interrupted"):
        _run(tmp_path, f"data.path={json.dumps(str(tmp_path / 'half'))}",
             f"data.tokenizer={json.dumps(str(tokenizer_dir))}")


def test_resume_refuses_changed_raw_data(tmp_path, tokenizer_dir):
    src = write_jsonl(tmp_path / "docs.jsonl", sample_texts(60))
    cfg = tiny_config(f"data.path={json.dumps(str(src))}", f"data.tokenizer={json.dumps(str(tokenizer_dir))}",
                      "train.max_steps=2")
    train(cfg, tmp_path / "run", show_progress=False)
    texts = sample_texts(60)
    texts[5] = texts[5][::-1]  # same size, different tokens
    write_jsonl(src, texts)
    cfg.train.max_steps = 4
    with pytest.raises(DataError, match="changed since the checkpoint"):
        train(cfg, tmp_path / "run", resume=True, show_progress=False)


def test_cli_data_prepare_info_and_eval(tmp_path, shakespeare, tokenizer_dir, capsys):
    from minipretrain.cli import main

    out = tmp_path / "prepared"
    main(["data", "prepare", "--data", str(shakespeare), "--tokenizer", str(tokenizer_dir), "--out", str(out),
          "--workers", "2", "--val-fraction", "0.05", "--no-progress"])
    printed = capsys.readouterr().out
    assert "documents" in printed and "bytes/token" in printed and "MB/s" in printed
    main(["data", "prepare", "--data", str(shakespeare), "--tokenizer", str(tokenizer_dir), "--out", str(out),
          "--no-progress", "--val-fraction", "0.05"])
    assert "up to date" in capsys.readouterr().out
    main(["data", "info", str(out)])
    assert "verified" in capsys.readouterr().out
    _run(tmp_path, f"data.path={json.dumps(str(out))}")
    capsys.readouterr()
    main(["eval", "--ckpt", str(tmp_path / "run"), "--data", str(out), "--json", "--device", "cpu"])
    result = json.loads(capsys.readouterr().out)
    assert result["split"] == "val" and result["loss"] > 0
    bad_calls = {
        "not a prepared dataset": ["data", "info", str(tmp_path)],
        "no tokenizer.json": ["data", "prepare", "--data", str(shakespeare), "--tokenizer", str(tmp_path),
                              "--out", str(tmp_path / "x")],
        "not found": ["data", "prepare", "--data", str(tmp_path / "missing.jsonl"), "--tokenizer",
                      str(tokenizer_dir), "--out", str(tmp_path / "y"), "--no-progress"],
        "--val-fraction must be in [0, 1)": ["data", "prepare", "--data", str(shakespeare), "--tokenizer",
                                             str(tokenizer_dir), "--out", str(tmp_path / "v"), "--val-fraction", "1"],
        "--workers must be at least 1": ["data", "prepare", "--data", str(shakespeare), "--tokenizer",
                                         str(tokenizer_dir), "--out", str(tmp_path / "z"), "--workers", "0"],
    }
    assert_cli_errors(bad_calls, capsys)
