"""Checkpoints: atomic, verified, resumable.

    runs/NAME/checkpoints/step_000120/
        model.safetensors      weights (tied matrix stored once)
        config.json            the model config (Hugging Face-style keys)
        config.toml            the full resolved training config
        tokenizer.json, tokenizer_config.json
        train_state.pt         optimizer, scaler, step, tokens, data position, RNG states (torch.load weights_only)
        meta.json              step and the sha256 of every file above; written last
    runs/NAME/latest           "checkpoints/step_000120"

A checkpoint is written to a temporary directory and renamed into place, then `latest` is replaced atomically,
so a crash mid-save leaves the previous checkpoint untouched. Loading verifies every checksum.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_model, save_model

from minipretrain.config import Config, ModelConfig, load_config
from minipretrain.errors import CheckpointError
from minipretrain.fileio import fsync_path, sha256_file, write_atomic
from minipretrain.model import MiniMind
from minipretrain.tokenizer import Tokenizer

CHECKPOINTS_DIR = "checkpoints"
LATEST = "latest"
META = "meta.json"
MODEL_FILE = "model.safetensors"
STATE_FILE = "train_state.pt"


def capture_rng() -> dict:
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng(state: dict) -> None:
    random.setstate(state["python"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy(), *rest))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def model_config_json(cfg: ModelConfig) -> dict:
    return {"model_type": "minimind", "tie_word_embeddings": True, "hidden_act": "silu", **cfg.__dict__}


def save_checkpoint(run_dir: Path, step: int, model: MiniMind, cfg: Config, tokenizer: Tokenizer,
                    train_state: dict, keep: int) -> Path:
    ckpt_root = run_dir / CHECKPOINTS_DIR
    ckpt_root.mkdir(parents=True, exist_ok=True)
    name = f"step_{step:06d}"
    tmp = ckpt_root / f".tmp_{name}_{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_model(model, str(tmp / MODEL_FILE))
    (tmp / "config.json").write_text(json.dumps(model_config_json(cfg.model), indent=2) + "\n")
    (tmp / "config.toml").write_text(cfg.to_toml())
    tokenizer.save(tmp)
    torch.save(train_state, tmp / STATE_FILE)
    files = sorted(p.name for p in tmp.iterdir())
    for f in files:
        fsync_path(tmp / f)
    meta = {"step": step, "tokenizer_fingerprint": tokenizer.fingerprint,
            "files": {f: sha256_file(tmp / f) for f in files}}
    (tmp / META).write_text(json.dumps(meta, indent=2) + "\n")
    fsync_path(tmp / META)

    final = ckpt_root / name
    if final.exists():  # re-saving a step (e.g. after resuming from it): swap, never leave a gap
        stale = ckpt_root / f".old_{name}_{os.getpid()}"
        os.replace(final, stale)
        os.replace(tmp, final)
        shutil.rmtree(stale, ignore_errors=True)
    else:
        os.replace(tmp, final)
    write_atomic(run_dir / LATEST, f"{CHECKPOINTS_DIR}/{name}\n")
    _prune(ckpt_root, keep, protect=final)
    return final


def _prune(ckpt_root: Path, keep: int, protect: Path) -> None:
    for leftover in [*ckpt_root.glob(".tmp_step_*"), *ckpt_root.glob(".old_step_*")]:  # from a killed save
        shutil.rmtree(leftover, ignore_errors=True)
    for old in complete_checkpoints(ckpt_root)[:-keep]:
        if old != protect:
            shutil.rmtree(old, ignore_errors=True)


def complete_checkpoints(ckpt_root: Path) -> list[Path]:
    """Checkpoint directories whose save finished (meta.json is written last), oldest first."""
    return sorted(p for p in ckpt_root.glob("step_*") if (p / META).exists())


def list_checkpoints(run_dir: Path) -> list[Path]:
    return sorted(p for p in (run_dir / CHECKPOINTS_DIR).glob("step_*") if p.is_dir())


def resolve_checkpoint(path: str | Path) -> Path:
    """A run directory (follows its `latest` pointer) or a checkpoint directory."""
    path = Path(path)
    if (path / LATEST).is_file():
        target = path / (path / LATEST).read_text().strip()
        if not target.is_dir():
            others = ", ".join(p.name for p in list_checkpoints(path)) or "none"
            raise CheckpointError(f"{path / LATEST} points to {target}, which does not exist "
                                  f"(checkpoints present: {others}); pass one of them explicitly")
        return target
    if (path / META).is_file() or (path / MODEL_FILE).is_file():
        return path
    if path.is_dir() and list_checkpoints(path):
        raise CheckpointError(f"{path} has checkpoints but no `{LATEST}` pointer; pass one of them explicitly: "
                              + ", ".join(str(p) for p in list_checkpoints(path)))
    raise CheckpointError(f"no checkpoint at {path} (expected a run directory with `{LATEST}` or a checkpoint directory)")


def verify_checkpoint(ckpt: Path) -> dict:
    """Check that the checkpoint is complete and every file matches its recorded sha256; return its metadata."""
    meta_path = ckpt / META
    if not meta_path.is_file():
        raise CheckpointError(f"checkpoint {ckpt} is incomplete ({META} missing): it was not fully written; "
                              "resume from an earlier checkpoint")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError:
        raise CheckpointError(f"checkpoint {ckpt} is corrupt ({META} is not valid JSON)") from None
    for name, digest in meta["files"].items():
        f = ckpt / name
        if not f.is_file():
            raise CheckpointError(f"checkpoint {ckpt} is corrupt: {name} is missing")
        if sha256_file(f) != digest:
            raise CheckpointError(f"checkpoint {ckpt} is corrupt: {name} does not match its recorded checksum; "
                                  "resume from an earlier checkpoint")
    return meta


def load_model_from_checkpoint(path: str | Path, device: str = "cpu") -> tuple[MiniMind, Tokenizer, Config, Path]:
    """Weights, tokenizer and config of a checkpoint (or a run's latest), verified."""
    ckpt = resolve_checkpoint(path)
    verify_checkpoint(ckpt)
    cfg = read_checkpoint_config(ckpt)
    model = MiniMind(cfg.model)
    missing, unexpected = load_model(model, str(ckpt / MODEL_FILE), strict=False, device=device)
    if missing or unexpected:
        raise CheckpointError(f"{ckpt / MODEL_FILE} does not match its config.json "
                              f"(missing: {missing[:3]}, unexpected: {unexpected[:3]})")
    return model.to(device), Tokenizer.load(ckpt), cfg, ckpt


def read_checkpoint_config(ckpt: Path) -> Config:
    return load_config(ckpt / "config.toml")


def load_train_state(ckpt: Path) -> dict:
    try:
        return torch.load(ckpt / STATE_FILE, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling errors have no common base class
        raise CheckpointError(f"{ckpt / STATE_FILE} cannot be read ({type(e).__name__}: {e})") from None
