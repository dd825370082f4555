"""A run's data, assembled from its config: the tokenizer, every source as prepared shards, the training sampler
and the validation rows.

    data = load_run_data(cfg, run_dir, checkpoint_tokenizer=None, log=print)
    batch = data.sampler.next_batch(cfg.train.batch_size)
    data.val_sets      # {source name: rows} for per-source validation loss
    data.fim_val_sets  # {source name: rows} scored on their middles (fim runs only)

A source that is a prepared directory (`minipretrain data prepare`) is used in place; a raw file, directory, glob or
built-in corpus is prepared on the fly into `<run_dir>/data/<name>/` (a no-op when that is already up to date).
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import chain
from pathlib import Path

from minipretrain.config import Config, DataConfig, SourceConfig, source_name
from minipretrain.data.batches import MixtureSampler, ObjectiveRows, make_rows
from minipretrain.data.objectives import EVAL_SEED, fim_middles, make_objective, validation_objective
from minipretrain.data.shards import PreparedData, PrepareOptions, default_workers, is_held_out, is_prepared, prepare
from minipretrain.data.sources import ReadStats, iter_documents
from minipretrain.errors import CheckpointError, ConfigError, DataError, UserError
from minipretrain.tokenizer import Tokenizer, train_tokenizer

RUN_DATA_DIR = "data"


@dataclass
class RunData:
    tokenizer: Tokenizer
    sampler: MixtureSampler
    val_sets: dict  # source name -> rows for evaluation
    fim_val_sets: dict  # source name -> the same rows with every document in PSM, scored on the middle (fim runs)


def _held_out_fraction(d: DataConfig) -> float:
    """Raw sources hold out data.val_fraction of their documents, unless data.val_path validates instead."""
    return 0.0 if d.val_path else d.val_fraction


def _raw_train_documents(source: SourceConfig, d: DataConfig):
    """A raw source's training documents, exactly those `prepare` puts in the train split."""
    docs = iter_documents(source.path, d.text_field, d.skip_bad_lines, ReadStats())
    return (text for i, text in enumerate(docs) if not is_held_out(i, _held_out_fraction(d)))


def _given_tokenizer(d: DataConfig, log=lambda message: None) -> Tokenizer | None:
    """data.tokenizer, else the one stored with the first prepared source; None when none is given."""
    if d.tokenizer:
        return Tokenizer.load(d.tokenizer)
    prepared = [s for s in d.mixture() if is_prepared(s.path)]
    if prepared:
        log(f"using the tokenizer stored with {prepared[0].path}")
        return Tokenizer.load(Path(prepared[0].path) / "tokenizer")
    return None


def check_objective_tokenizer(cfg: Config) -> None:
    """Before a new run touches its directory: the given tokenizer has the special tokens train.objective needs
    (a tokenizer trained for the run always has them)."""
    if cfg.train.objective == "clm":
        return
    tokenizer = _given_tokenizer(cfg.data)
    if tokenizer is not None:
        make_objective(cfg.train, tokenizer)


def choose_tokenizer(cfg: Config, run_dir: Path, checkpoint_tokenizer: Tokenizer | None, log) -> Tokenizer:
    """The checkpoint's tokenizer on resume; else data.tokenizer; else the one stored with prepared data; else a
    new one trained on the raw sources' training documents (saved in the run directory)."""
    d = cfg.data
    if checkpoint_tokenizer is not None:
        if d.tokenizer:
            wanted = Tokenizer.load(d.tokenizer)
            if wanted.fingerprint != checkpoint_tokenizer.fingerprint:
                raise CheckpointError(
                    f"cannot continue a checkpoint with another tokenizer: data.tokenizer={d.tokenizer} has "
                    f"fingerprint {wanted.fingerprint}, the checkpoint's is {checkpoint_tokenizer.fingerprint}")
        return checkpoint_tokenizer
    given = _given_tokenizer(d, log)
    if given is not None:
        return given
    log(f"training a {cfg.model.vocab_size}-token BPE tokenizer on the training documents")
    texts = chain.from_iterable(_raw_train_documents(s, d) for s in d.mixture())
    tokenizer = train_tokenizer(texts, cfg.model.vocab_size, show_progress=False)
    tokenizer.save(run_dir / "tokenizer")
    return tokenizer


def _prepared(path: str, name: str, cfg: Config, run_dir: Path, tokenizer: Tokenizer, val_fraction: float,
              show_progress: bool, log, verify: bool = True) -> PreparedData:
    """A prepared directory as it is, or a raw source prepared into the run directory."""
    d = cfg.data
    if not is_prepared(path):
        if Path(path).is_dir() and any(Path(path).glob("*.bin")):
            raise DataError(f"{path} holds token shards but no manifest.json: its preparation was interrupted; "
                            "run `minipretrain data prepare` again")
        options = PrepareOptions(d.text_field, d.skip_bad_lines, val_fraction,
                                 workers=d.prepare_workers or default_workers())
        out = run_dir / RUN_DATA_DIR / name
        prepare([path], tokenizer, out, options, show_progress=show_progress, overwrite=True, log=log)
        path = out
    return PreparedData(path, tokenizer.fingerprint, verify=verify, show_progress=show_progress)


def load_run_data(cfg: Config, run_dir: Path, checkpoint_tokenizer: Tokenizer | None = None,
                  show_progress: bool = True, log=print, verify_shards: bool = True) -> RunData:
    """verify_shards=False skips the sha256 of every shard (the other ranks, once rank 0 has checked them)."""
    d, seq_len = cfg.data, cfg.train.seq_len
    tokenizer = choose_tokenizer(cfg, run_dir, checkpoint_tokenizer, log)
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's "
                          f"{tokenizer.vocab_size} tokens: raise model.vocab_size or use a smaller tokenizer")
    objective = make_objective(cfg.train, tokenizer)  # before preparing data: a tokenizer without FIM tokens fails now
    val_fraction = _held_out_fraction(d)
    mixture = d.mixture()
    train_sources, val_sets, fingerprints = [], {}, []
    for source in mixture:
        data = _prepared(source.path, source.name, cfg, run_dir, tokenizer, val_fraction, show_progress, log,
                         verify_shards)
        train = data.split("train")
        if train is None:
            raise DataError(f"data source {source.path} has no training documents")
        val = data.split("val")
        if val is None and val_fraction > 0 and not is_prepared(source.path):
            raise DataError(f"{source.path} has only {train.num_documents} document(s): too few to hold out "
                            f"data.val_fraction={val_fraction} for validation (one document in "
                            f"{round(1 / val_fraction)} is held out); add data, set data.val_path, or set "
                            "data.val_fraction=0")
        rows = make_rows(train, d.layout, seq_len, tokenizer, d.document_mask)
        if len(rows) == 0:
            raise UserError(f"the training data {source.path} has {train.num_tokens:,} tokens, fewer than one row "
                            f"of train.seq_len={seq_len}: lower train.seq_len or add data")
        share = f", weight {source.weight / sum(s.weight for s in mixture):.3f}" if len(mixture) > 1 else ""
        log(f"train {source.name}: {train.num_documents:,} documents, {train.num_tokens:,} tokens "
            f"({train.num_bytes / max(train.num_tokens, 1):.2f} bytes/token), {len(rows):,} rows of {seq_len} "
            f"({d.layout}{', document-masked' if d.document_mask else ''}){share}")
        train_sources.append((source.name, rows))
        fingerprints.append(data.data_fingerprint)
        if val is not None and not d.val_path:
            val_sets[source.name] = make_rows(val, d.layout, seq_len, tokenizer, d.document_mask, for_eval=True)
            log(f"validation {source.name}: {val.num_documents:,} documents, {val.num_tokens:,} tokens")
    if d.val_path:
        name = "val"
        data = _prepared(d.val_path, f"{name}-{source_name(d.val_path)}", cfg, run_dir, tokenizer, 0.0,
                         show_progress, log, verify_shards)
        val = data.split("val") or data.split("train")
        val_sets[name] = make_rows(val, d.layout, seq_len, tokenizer, d.document_mask, for_eval=True)
        log(f"validation {d.val_path}: {val.num_documents:,} documents, {val.num_tokens:,} tokens")
    sampler = MixtureSampler(train_sources, [s.weight for s in mixture], cfg.train.seed, fingerprints=fingerprints,
                             objective=objective)
    scored = validation_objective(objective)
    fim_val_sets = ({name: ObjectiveRows(rows, fim_middles(tokenizer), EVAL_SEED) for name, rows in val_sets.items()}
                    if objective.name == "fim" else {})
    val_sets = {name: ObjectiveRows(rows, scored, EVAL_SEED) for name, rows in val_sets.items()}
    return RunData(tokenizer, sampler, val_sets, fim_val_sets)
