"""Pre-tokenized token shards: the on-disk format, the preparation that writes them, and the memory-mapped reader.

    manifest = prepare(["corpus.jsonl"], tokenizer, "prepared/", PrepareOptions(workers=4))  # streams; bounded memory
    train = PreparedData("prepared/", tokenizer.fingerprint).split("train")   # TokenShards over memory maps
    train.read(0, 512)                                                         # the first 512 tokens

A prepared dataset is a directory:

    manifest.json        written last: format, tokenizer fingerprint, inputs, every shard's size and sha256, summary
    tokenizer/           the tokenizer that made the shards (training can take it from here)
    train_00000.bin ...  the training split
    val_00000.bin ...    the held-out split (every round(1 / val_fraction)-th document)

A shard is one file: a 256-byte header (magic, format version, bytes per token, vocabulary size, token count,
document count, tokenizer fingerprint), then the tokens of every document each followed by eos (the packed stream
itself), then the document index (uint64 start offset of every document). Document i is recovered exactly as
tokens[start[i] : start[i + 1] - 1].

Preparation builds everything in `<out>.partial/` and renames it into place at the end, so an interrupted run never
leaves shards that look complete.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import struct
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path

import numpy as np
from tqdm import tqdm

from minipretrain.data.sources import ReadStats, iter_documents, resolve_files
from minipretrain.errors import DataError
from minipretrain.fileio import sha256_file, write_atomic
from minipretrain.tokenizer import Tokenizer

MAGIC = b"MPTOKENS"
FORMAT_VERSION = 1
HEADER_SIZE = 256
_HEADER = struct.Struct("<8sIIQQQ64s")  # magic, version, bytes per token, vocab, tokens, documents, fingerprint
MANIFEST = "manifest.json"
SPLITS = ("train", "val")
DEFAULT_SHARD_TOKENS = 100_000_000
CHUNK_BYTES = 1 << 20  # text handed to a worker at a time


def default_workers() -> int:
    return os.cpu_count() or 1


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def is_held_out(index: np.ndarray | int, fraction: float):
    """Document `index` goes to validation when it crosses a multiple of 1/fraction: evenly spaced, the same for
    every seed and every run, decidable while streaming (the first one is document round(0.5 / fraction))."""
    if fraction <= 0:
        return np.zeros_like(index, dtype=bool) if isinstance(index, np.ndarray) else False
    return np.floor((index + 1) * fraction + 0.5) > np.floor(index * fraction + 0.5)


# --------------------------------------------------------------------------------------------------- writing


class ShardWriter:
    """Appends documents (tokens + eos) to numbered shards of one split; a shard closes after the first `add`
    that takes it to `shard_tokens` tokens (documents are never split across shards)."""

    def __init__(self, directory: Path, split: str, vocab_size: int, fingerprint: str, shard_tokens: int):
        self.directory, self.split, self.shard_tokens = directory, split, shard_tokens
        self.vocab_size, self.fingerprint = vocab_size, fingerprint
        self.dtype = token_dtype(self.vocab_size)
        self.shards: list[dict] = []
        self._file = None
        self._ended = True  # whether the last piece added ended its document

    def _open(self) -> None:
        name = f"{self.split}_{len(self.shards):05d}.bin"
        self._file = open(self.directory / name, "wb")  # noqa: SIM115 (open across add() calls; closed in _close)
        self._file.write(b"\0" * HEADER_SIZE)  # the real header is written when the shard closes
        self._name, self._tokens, self._bytes, self._starts = name, 0, 0, []

    def add(self, tokens: np.ndarray, lengths: np.ndarray, doc_bytes: np.ndarray,
            ends: np.ndarray | None = None) -> None:
        """tokens: documents (or pieces of them) back to back, each document followed by eos; lengths include the
        eos. ends[i]: whether piece i ends its document (default: every piece is a whole document); a document in
        pieces may span several calls."""
        if len(lengths) == 0:
            return
        if self._file is None:
            self._open()
        ends = np.ones(len(lengths), dtype=bool) if ends is None else ends
        begins = np.concatenate([[self._ended], ends[:-1]])  # a piece after the end of a document begins one
        starts = self._tokens + np.concatenate([[0], np.cumsum(lengths[:-1])])
        self._starts.append(starts[begins].astype(np.uint64))
        self._file.write(tokens.astype(self.dtype, copy=False).tobytes())
        self._tokens += int(lengths.sum())
        self._bytes += int(doc_bytes.sum())
        self._ended = bool(ends[-1])
        if self._tokens >= self.shard_tokens and self._ended:  # documents never straddle shards
            self._close()

    def _close(self) -> None:
        f = self._file
        starts = np.concatenate(self._starts)
        f.write(b"\0" * (-f.tell() % 8))  # align the index
        f.write(starts.tobytes())
        f.seek(0)
        f.write(_HEADER.pack(MAGIC, FORMAT_VERSION, self.dtype.itemsize, self.vocab_size, self._tokens, len(starts),
                             self.fingerprint.encode("ascii")))
        f.flush()
        os.fsync(f.fileno())
        f.close()
        path = self.directory / self._name
        self.shards.append({"file": self._name, "tokens": self._tokens, "documents": len(starts),
                            "bytes": self._bytes, "size": path.stat().st_size, "sha256": sha256_file(path)})
        self._file = None

    def finish(self) -> dict:
        if self._file is not None:
            self._close()
        return {"tokens": sum(s["tokens"] for s in self.shards), "documents": sum(s["documents"] for s in self.shards),
                "bytes": sum(s["bytes"] for s in self.shards), "shards": self.shards}


_worker_tokenizer: Tokenizer | None = None


def _init_worker(tokenizer_json: str) -> None:
    from tokenizers import Tokenizer as HFTokenizer

    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core per worker: the parallelism is the processes
    global _worker_tokenizer
    _worker_tokenizer = Tokenizer(HFTokenizer.from_str(tokenizer_json))


def _encode_chunk(texts: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(tokens of the texts back to back, tokens per text, UTF-8 bytes per text)."""
    ids = _worker_tokenizer.encode_batch(texts)
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    tokens = np.fromiter(chain.from_iterable(ids), dtype=np.int64, count=int(lengths.sum()))
    text_bytes = np.fromiter((len(t.encode("utf-8")) for t in texts), dtype=np.int64, count=len(texts))
    return tokens, lengths, text_bytes


def _chunks(documents, chunk_bytes: int, tokenizer: Tokenizer):
    """(texts, ends) of about `chunk_bytes` characters at a time: a document longer than PIECE_CHARS comes as
    pieces that encode exactly as the whole (Tokenizer.piece_ends), so no document, however long, is handed to the
    tokenizer whole; ends[i] tells whether texts[i] ends its document."""
    texts, ends, size = [], [], 0
    for document in documents:
        start = 0
        for end in tokenizer.piece_ends(document):
            texts.append(document[start:end])  # the document itself when it is one piece
            ends.append(end == len(document))
            size += end - start
            # the last piece of a long document ends its chunk too: shards close only where a chunk ends a document
            if size >= chunk_bytes or (start > 0 and end == len(document)):
                yield texts, np.asarray(ends)
                texts, ends, size = [], [], 0
            start = end
    if texts:
        yield texts, np.asarray(ends)


def _encoded_documents(documents, tokenizer: Tokenizer, workers: int):
    """(tokens, lengths, UTF-8 bytes, ends) of each chunk's pieces, an eos after each piece that ends a document."""
    ends_in_flight = deque()  # the workers see only texts; ends wait here, in order

    def texts():
        for chunk, ends in _chunks(documents, CHUNK_BYTES, tokenizer):
            ends_in_flight.append(ends)
            yield chunk

    for tokens, lengths, text_bytes in _encoded_chunks(texts(), tokenizer, workers):
        ends = ends_in_flight.popleft()
        tokens = np.insert(tokens, np.cumsum(lengths)[ends], tokenizer.eos_id)
        yield tokens, lengths + ends, text_bytes, ends


def input_identity(inputs: list[str]) -> list[dict]:
    """What the shards were made from: each file's path, size and modification time (the built-in corpus: the
    Python that ships it). Equal identities mean re-preparing would write the same shards."""
    files = []
    for spec in inputs:
        if spec.startswith("builtin:"):
            files.append({"path": spec, "python": sys.version.split()[0]})
            continue
        for path in resolve_files(spec):
            st = path.stat()
            files.append({"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns})
    return files


def _input_size(files: list[dict]) -> int | None:
    """Total bytes the readers will report (from input_identity), for the progress bar; unknown for the built-in
    corpus and for Parquet, which is compressed."""
    if any("size" not in f or f["path"].endswith(".parquet") for f in files):
        return None
    return sum(f["size"] for f in files)


def _encoded_chunks(chunks, tokenizer: Tokenizer, workers: int):
    """Encode chunks in order with `workers` processes, at most 2 chunks per worker in flight (bounded memory
    however large the input; Pool.imap would read ahead without limit). One worker encodes in this process."""
    import multiprocessing as mp

    if workers == 1:
        global _worker_tokenizer
        _worker_tokenizer = tokenizer
        yield from map(_encode_chunk, chunks)
        return
    # spawn, not fork: the parent may hold torch and tokenizers thread pools, which do not survive a fork
    with mp.get_context("spawn").Pool(workers, _init_worker, (tokenizer.hf.to_str(),)) as pool:
        pending = deque()
        for chunk in chunks:
            pending.append(pool.apply_async(_encode_chunk, (chunk,)))
            if len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


@dataclass
class PrepareOptions:
    text_field: str = "text"
    skip_bad_lines: bool = False
    val_fraction: float = 0.0
    shard_tokens: int = DEFAULT_SHARD_TOKENS
    workers: int = field(default_factory=default_workers)

    def identity(self) -> dict:
        """The options that change the token stream (the worker count and shard size do not)."""
        return {"text_field": self.text_field, "skip_bad_lines": self.skip_bad_lines,
                "val_fraction": self.val_fraction}


def prepare(inputs: list[str], tokenizer: Tokenizer, out: str | Path, options: PrepareOptions | None = None,
            show_progress: bool = True, overwrite: bool = False, log=print) -> dict:
    """Tokenize `inputs` into shards in `out`; returns the manifest. A no-op when `out` already holds shards of
    the same inputs, options and tokenizer."""
    options = options or PrepareOptions()
    out = Path(out)
    if options.workers < 1:
        raise DataError(f"--workers must be at least 1, got {options.workers}")
    if not 0 <= options.val_fraction < 1:
        raise DataError(f"--val-fraction must be in [0, 1), got {options.val_fraction}")
    if options.shard_tokens < 1:
        raise DataError(f"--shard-tokens must be at least 1, got {options.shard_tokens}")
    identity = {"inputs": input_identity(inputs), "options": options.identity(),
                "tokenizer_fingerprint": tokenizer.fingerprint, "version": FORMAT_VERSION}
    if (out / MANIFEST).is_file():
        existing = read_manifest(out)
        if all(existing.get(k) == v for k, v in identity.items()):
            log(f"{out} is up to date ({existing['summary']['tokens']:,} tokens): nothing to do")
            return existing
        if not overwrite:
            raise DataError(f"{out} already holds prepared data from other inputs, options or tokenizer: "
                            "choose another --out or pass --overwrite to replace it")
    elif out.exists() and any(out.iterdir()) and not overwrite:
        raise DataError(f"{out} exists and is not a prepared dataset: choose another --out or pass --overwrite")

    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    tokenizer.save(partial / "tokenizer")
    writers = {s: ShardWriter(partial, s, tokenizer.vocab_size, tokenizer.fingerprint, options.shard_tokens)
               for s in SPLITS}
    stats = ReadStats()
    documents = chain.from_iterable(
        iter_documents(spec, options.text_field, options.skip_bad_lines, stats) for spec in inputs)
    start, doc_index, tokens_done = time.perf_counter(), 0, 0
    bar = tqdm(total=_input_size(identity["inputs"]), desc=f"prepare {out.name}", unit="B", unit_scale=True,
               disable=not show_progress, dynamic_ncols=True)
    try:
        for tokens, lengths, doc_bytes, ends in _encoded_documents(documents, tokenizer, options.workers):
            # a document's pieces share its index, so all of it goes to one split
            held_out = is_held_out(doc_index + np.concatenate([[0], np.cumsum(ends[:-1])]), options.val_fraction)
            token_held_out = np.repeat(held_out, lengths)
            writers["train"].add(tokens[~token_held_out], lengths[~held_out], doc_bytes[~held_out], ends[~held_out])
            writers["val"].add(tokens[token_held_out], lengths[held_out], doc_bytes[held_out], ends[held_out])
            doc_index += int(ends.sum())
            tokens_done += int(lengths.sum())
            bar.update(stats.input_bytes - bar.n)
            bar.set_postfix_str(f"{tokens_done / max(time.perf_counter() - start, 1e-9):,.0f} tok/s", refresh=False)
        splits = {s: w.finish() for s, w in writers.items()}
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    finally:
        bar.close()
    if stats.documents == 0:
        shutil.rmtree(partial, ignore_errors=True)
        raise DataError(f"no documents in {' '.join(inputs)} ({stats.summary()}): nothing to prepare")
    seconds = time.perf_counter() - start
    total_tokens = sum(s["tokens"] for s in splits.values())
    summary = {
        "documents": stats.documents, "tokens": total_tokens, "bytes": stats.bytes,
        "bytes_per_token": round(stats.bytes / max(total_tokens, 1), 4), "empty_documents": stats.empty,
        "skipped_lines": dict(stats.skipped), "seconds": round(seconds, 2),
        "input_bytes": stats.input_bytes, "workers": options.workers,
        "mb_per_s": round(stats.input_bytes / 1e6 / max(seconds, 1e-9), 2),
    }
    manifest = {"format": "minipretrain-tokens", **identity, "vocab_size": tokenizer.vocab_size,
                "dtype": token_dtype(tokenizer.vocab_size).name, "splits": splits, "summary": summary}
    write_atomic(partial / MANIFEST, json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    if out.exists():
        shutil.rmtree(out)
    partial.rename(out)
    log(f"prepared {out}: {describe(manifest)}")
    return manifest


def describe(manifest: dict) -> str:
    s = manifest["summary"]
    splits = ", ".join(f"{name} {v['tokens']:,} tokens / {v['documents']:,} docs"
                       for name, v in manifest["splits"].items() if v["documents"])
    parts = [f"{s['documents']:,} documents", f"{s['tokens']:,} tokens", f"{s['bytes_per_token']:.2f} bytes/token",
             splits]
    if s["empty_documents"]:
        parts.append(f"{s['empty_documents']:,} empty documents skipped")
    parts += [f"{n:,} lines skipped ({reason})" for reason, n in sorted(s["skipped_lines"].items())]
    parts.append(f"{s['mb_per_s']:.1f} MB/s with {s['workers']} worker(s)")
    return "; ".join(parts)


# --------------------------------------------------------------------------------------------------- reading


def is_prepared(path: str | Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def read_manifest(directory: str | Path) -> dict:
    path = Path(directory) / MANIFEST
    if not path.is_file():
        hint = " (preparation was interrupted? run `minipretrain data prepare` again)" if Path(
            str(directory) + ".partial").exists() else ""
        raise DataError(f"{directory} is not a prepared dataset: no {MANIFEST}{hint}")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not valid JSON ({e}); prepare the data again") from None
    if manifest.get("format") != "minipretrain-tokens" or manifest.get("version") != FORMAT_VERSION:
        raise DataError(f"{path}: not a minipretrain token manifest of format version {FORMAT_VERSION}; "
                        "prepare the data again with this version")
    return manifest


def data_fingerprint(manifest: dict) -> str:
    """Identifies the tokens themselves: the checksums of every shard."""
    checksums = [s["sha256"] for split in SPLITS for s in manifest["splits"][split]["shards"]]
    return hashlib.sha256(" ".join(checksums).encode()).hexdigest()[:16]


class TokenShards:
    """One split of a prepared dataset as a single token stream: the concatenation of its shards, memory-mapped.
    Only the pages a batch touches are ever read."""

    def __init__(self, directory: Path, shards: list[dict], dtype: np.dtype):
        self._tokens, self._starts = [], []
        for shard in shards:
            path = directory / shard["file"]
            index_at = HEADER_SIZE + math.ceil(shard["tokens"] * dtype.itemsize / 8) * 8
            self._tokens.append(np.memmap(path, dtype=dtype, mode="r", offset=HEADER_SIZE, shape=(shard["tokens"],)))
            self._starts.append(np.memmap(path, dtype=np.uint64, mode="r", offset=index_at,
                                          shape=(shard["documents"],)))
        self._token_offsets = np.concatenate([[0], np.cumsum([s["tokens"] for s in shards], dtype=np.int64)])
        self._doc_offsets = np.concatenate([[0], np.cumsum([s["documents"] for s in shards], dtype=np.int64)])
        self.num_tokens, self.num_documents = int(self._token_offsets[-1]), int(self._doc_offsets[-1])
        self.num_bytes = sum(s["bytes"] for s in shards)

    def read(self, start: int, stop: int) -> np.ndarray:
        """Tokens [start, stop) of the stream as int64 (a row may span shards)."""
        pieces = []
        first = int(np.searchsorted(self._token_offsets, start, side="right")) - 1
        for s in range(first, len(self._tokens)):
            lo, hi = self._token_offsets[s], self._token_offsets[s + 1]
            if lo >= stop:
                break
            pieces.append(self._tokens[s][max(start - lo, 0) : min(stop, hi) - lo])
        return np.concatenate(pieces).astype(np.int64) if pieces else np.zeros(0, dtype=np.int64)

    def document_starts(self, start: int, stop: int) -> np.ndarray:
        """Stream offsets of the documents that begin inside [start, stop)."""
        found = []
        first = int(np.searchsorted(self._token_offsets, start, side="right")) - 1
        last = int(np.searchsorted(self._token_offsets, stop - 1, side="right")) - 1
        for s in range(max(first, 0), min(last, len(self._tokens) - 1) + 1):
            lo = self._token_offsets[s]
            starts = self._starts[s]
            a = np.searchsorted(starts, max(start - lo, 0))  # binary search on the memory map: a few pages
            b = np.searchsorted(starts, stop - lo)
            found.append(starts[a:b].astype(np.int64) + lo)
        return np.concatenate(found) if found else np.zeros(0, dtype=np.int64)

    def document(self, i: int) -> np.ndarray:
        """Document i's tokens followed by its eos."""
        s = int(np.searchsorted(self._doc_offsets, i, side="right")) - 1
        local = i - self._doc_offsets[s]
        starts = self._starts[s]
        begin = int(starts[local])
        end = int(starts[local + 1]) if local + 1 < len(starts) else len(self._tokens[s])
        return self._tokens[s][begin:end].astype(np.int64)


class PreparedData:
    """A prepared dataset directory, checked: manifest, tokenizer fingerprint, every shard's header, size and
    (with verify=True) sha256."""

    def __init__(self, directory: str | Path, expected_fingerprint: str | None = None, verify: bool = True,
                 show_progress: bool = False):
        self.directory = Path(directory)
        self.manifest = read_manifest(self.directory)
        m = self.manifest
        self.fingerprint = m["tokenizer_fingerprint"]
        if expected_fingerprint is not None and expected_fingerprint != self.fingerprint:
            raise DataError(f"{self.directory} was prepared with tokenizer {self.fingerprint}, but this run's "
                            f"tokenizer is {expected_fingerprint}: prepare the data again with the run's tokenizer "
                            "(or set data.tokenizer to the one the data was prepared with)")
        self.dtype = np.dtype(m["dtype"])
        shards = [s for split in SPLITS for s in m["splits"][split]["shards"]]
        big = sum(s["size"] for s in shards) > 1 << 30  # hashing takes seconds: show it
        for shard in tqdm(shards, desc="verify shards", unit="shard", disable=not (show_progress and big), leave=False):
            self._check_shard(shard, verify)

    def _check_shard(self, shard: dict, verify: bool) -> None:
        path = self.directory / shard["file"]
        if not path.is_file():
            raise DataError(f"shard {path} is missing: prepare the data again")
        size = path.stat().st_size
        if size != shard["size"]:
            raise DataError(f"shard {path} is {size:,} bytes but the manifest says {shard['size']:,} "
                            "(truncated or replaced): prepare the data again")
        with open(path, "rb") as f:
            magic, version, itemsize, vocab, tokens, documents, fingerprint = _HEADER.unpack(f.read(_HEADER.size))
        header_ok = (magic == MAGIC and version == FORMAT_VERSION and itemsize == self.dtype.itemsize
                     and vocab == self.manifest["vocab_size"] and tokens == shard["tokens"]
                     and documents == shard["documents"] and fingerprint.rstrip(b"\0").decode() == self.fingerprint)
        if not header_ok:
            raise DataError(f"shard {path}: header does not match the manifest (corrupt): prepare the data again")
        if verify and sha256_file(path) != shard["sha256"]:
            raise DataError(f"shard {path}: sha256 checksum mismatch (corrupt): prepare the data again")

    def split(self, name: str) -> TokenShards | None:
        """The split's token stream, or None when it holds no documents."""
        info = self.manifest["splits"][name]
        return TokenShards(self.directory, info["shards"], self.dtype) if info["documents"] else None

    @property
    def data_fingerprint(self) -> str:
        return data_fingerprint(self.manifest)
