"""Where documents come from: MiniMind JSONL, plain text files, directories and globs of them, and the built-in
corpus `builtin:python-docs` (the documentation that ships inside CPython, so a fresh machine needs no download).

Every reader yields one document (a str) at a time. Bad input stops with an error naming file and line, or, with
`skip_bad_lines`, is counted by reason in a `ReadStats` and skipped.
"""

from __future__ import annotations

import ast
import glob
import json
import os
import sysconfig
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from minipretrain.errors import DataError

BUILTIN_PYTHON_DOCS = "builtin:python-docs"
JSONL_SUFFIXES = (".jsonl", ".json")
TEXT_SUFFIXES = (".txt", ".md", ".text")
PARQUET_SUFFIXES = (".parquet",)
KNOWN_SUFFIXES = JSONL_SUFFIXES + TEXT_SUFFIXES + PARQUET_SUFFIXES


@dataclass
class ReadStats:
    documents: int = 0
    bytes: int = 0  # UTF-8 bytes of the documents yielded
    input_bytes: int = 0  # bytes read from the input files (for progress and MB/s)
    empty: int = 0  # documents with no text, skipped
    skipped: Counter = field(default_factory=Counter)  # bad lines skipped, by reason

    def summary(self) -> str:
        parts = [f"{self.documents:,} documents", f"{self.bytes / 1e6:.1f} MB"]
        if self.empty:
            parts.append(f"{self.empty:,} empty skipped")
        parts += [f"{n:,} skipped ({reason})" for reason, n in sorted(self.skipped.items())]
        return ", ".join(parts)


def resolve_files(spec: str) -> list[Path]:
    """A file, a directory (its .jsonl/.json/.txt/.md/.parquet files, recursively) or a glob, in sorted order."""
    path = Path(spec).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in KNOWN_SUFFIXES)
        if not files:
            raise DataError(f"data directory {spec} has no {', '.join(KNOWN_SUFFIXES)} files")
        return files
    if glob.has_magic(spec):
        files = sorted(Path(p) for p in glob.glob(os.path.expanduser(spec), recursive=True) if Path(p).is_file())
        if not files:
            raise DataError(f"data glob {spec} matches no files")
        return files
    raise DataError(f"data file {spec} not found (give a file, directory, glob or {BUILTIN_PYTHON_DOCS})")


def iter_documents(spec: str, text_field: str = "text", skip_bad_lines: bool = False,
                   stats: ReadStats | None = None) -> Iterator[str]:
    stats = stats if stats is not None else ReadStats()
    if spec == BUILTIN_PYTHON_DOCS:
        sources = [python_docs()]
    elif spec.startswith("builtin:"):
        raise DataError(f"unknown built-in corpus {spec} (available: {BUILTIN_PYTHON_DOCS})")
    else:
        sources = [_reader(f)(f, text_field, skip_bad_lines, stats) for f in resolve_files(spec)]
    for source in sources:
        for text in source:
            if spec == BUILTIN_PYTHON_DOCS:
                stats.input_bytes += len(text.encode("utf-8"))
            if not text or text.isspace():  # not text.strip(): that copies a long document
                stats.empty += 1
                continue
            stats.documents += 1
            stats.bytes += len(text.encode("utf-8"))
            yield text


def _bad_line(message: str, reason: str, skip: bool, stats: ReadStats) -> None:
    if not skip:
        raise DataError(f"{message} (set data.skip_bad_lines=true to skip and count such lines)")
    stats.skipped[reason] += 1


def _reader(path: Path):
    if path.suffix in JSONL_SUFFIXES:
        return _read_jsonl
    if path.suffix in PARQUET_SUFFIXES:
        return _read_parquet
    return _read_text


def _read_jsonl(path: Path, text_field: str, skip: bool, stats: ReadStats) -> Iterator[str]:
    with open(path, "rb") as f:
        line_no = 0
        for raw in f:
            line_no += 1  # noqa: SIM113 (enumerate's reused result tuple would keep the last line alive)
            stats.input_bytes += len(raw)
            text = _jsonl_text(raw, f"{path}:{line_no}", line_no == 1, text_field, skip, stats)
            del raw  # a 40 MB line is not kept beside its text while the text is tokenized
            if text is not None:
                yield text


def _jsonl_text(raw: bytes, where: str, first: bool, text_field: str, skip: bool, stats: ReadStats) -> str | None:
    """The text of one JSONL line, or None for a blank or (skipped) bad line; the decoded line and the record
    are freed on return, only the text is kept."""
    try:
        line = raw.decode("utf-8-sig" if first else "utf-8")  # tolerate a byte-order mark
    except UnicodeDecodeError as e:
        return _bad_line(f"{where}: invalid UTF-8 at byte {e.start}", "invalid UTF-8", skip, stats)
    if not line or line.isspace():
        return None
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        return _bad_line(f"{where}: malformed JSON ({e.msg} at column {e.colno})", "malformed JSON", skip, stats)
    if not isinstance(record, dict) or text_field not in record:
        return _bad_line(f"{where}: no {text_field!r} field (set data.text_field to the field that holds the text)",
                         "missing text field", skip, stats)
    text = record[text_field]
    if not isinstance(text, str):
        return _bad_line(f"{where}: field {text_field!r} is not a string (got {type(text).__name__})",
                         "non-string text", skip, stats)
    return text


def _read_text(path: Path, text_field: str, skip: bool, stats: ReadStats) -> Iterator[str]:
    """Plain text: documents are separated by blank lines; line ends are normalised to \\n."""
    paragraph: list[str] = []
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            stats.input_bytes += len(raw)
            try:
                line = raw.decode("utf-8-sig" if line_no == 1 else "utf-8").rstrip("\r\n")
            except UnicodeDecodeError as e:
                _bad_line(f"{path}:{line_no}: invalid UTF-8 at byte {e.start}", "invalid UTF-8", skip, stats)
                continue
            if line.strip():
                paragraph.append(line)
            elif paragraph:
                yield "\n".join(paragraph)
                paragraph = []
    if paragraph:
        yield "\n".join(paragraph)


def _read_parquet(path: Path, text_field: str, skip: bool, stats: ReadStats) -> Iterator[str]:
    """One document per row of the `text_field` column, read a record batch at a time."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading Parquet needs pyarrow: pip install 'minipretrain[parquet]'") from None
    try:
        parquet = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid and friends on a file that is not Parquet
        raise DataError(f"{path}: not a readable Parquet file ({e})") from None
    columns = parquet.schema_arrow.names
    if text_field not in columns:
        raise DataError(f"{path}: no column {text_field!r} (columns: {', '.join(columns)}); set data.text_field")
    row = 0
    for batch in parquet.iter_batches(columns=[text_field], batch_size=1024):
        for text in batch.column(0).to_pylist():
            row += 1
            if not isinstance(text, str):
                _bad_line(f"{path}: row {row}: column {text_field!r} is not a string (got {type(text).__name__})",
                          "non-string text", skip, stats)
                continue
            stats.input_bytes += len(text.encode("utf-8"))
            yield text


def python_docs() -> Iterator[str]:
    """CPython's own documentation: the `pydoc_data` topics (the language reference as `help()` shows it),
    then the docstrings of the installed standard-library sources, one document per module, read with `ast`
    (nothing is imported or executed)."""
    from pydoc_data.topics import topics

    for name in sorted(topics):
        yield topics[name]
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(stdlib.rglob("*.py")):
        parts = path.relative_to(stdlib).parts
        if any(p in ("site-packages", "dist-packages", "test", "tests", "idlelib") for p in parts):
            continue
        doc = _module_docstrings(path, ".".join(parts)[: -len(".py")])
        if doc:
            yield doc


def _module_docstrings(path: Path, module: str) -> str:
    try:
        tree = ast.parse(path.read_bytes())
    except (SyntaxError, ValueError, OSError):
        return ""
    sections = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc and len(doc) > 40:  # one-liners like "Return x." teach little
                title = module if isinstance(node, ast.Module) else f"{module}.{node.name}"
                sections.append(f"{title}\n\n{doc}")
    return "\n\n".join(sections)
