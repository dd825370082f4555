"""Checkpoints: atomic, verified, resumable on any number of processes.

    runs/NAME/checkpoints/step_000120/
        dcp/                   weights and optimizer state as a torch.distributed.checkpoint (DCP): every rank
                               writes its own shard, and any number of ranks can load it (resharding)
        model.safetensors      the weights in one file (tied matrix stored once); written by single-process runs,
                               and by `minipretrain checkpoint consolidate` for distributed ones
        config.json            the model config (Hugging Face-style keys)
        config.toml            the full resolved training config
        tokenizer.json, tokenizer_config.json
        train_state.pt         scaler, step, tokens, data position (torch.load weights_only)
        rng_00000.pt ...       each rank's Python, NumPy, torch and CUDA RNG states (torch.load weights_only)
        meta.json              step and the sha256 of every file above; written last
    runs/NAME/latest           "checkpoints/step_000120"

A checkpoint is written to a temporary directory and renamed into place, then `latest` is replaced atomically,
so a crash mid-save leaves the previous checkpoint untouched. Loading verifies every checksum. DCP's index file
(`.metadata`) is a pickle: it is read with an allow-list of checkpoint classes, so a checkpoint cannot run code.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_model, save_file, save_model
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import StorageMeta
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.utils._pytree import tree_map

from minipretrain.config import Config, ModelConfig, load_config
from minipretrain.errors import CheckpointError
from minipretrain.fileio import fsync_path, load_weights_only, new_directory, sha256_file, write_atomic
from minipretrain.model import MiniMind
from minipretrain.parallel import World
from minipretrain.tokenizer import Tokenizer
from minipretrain.train.optim import optimizer_list

CHECKPOINTS_DIR = "checkpoints"
LATEST = "latest"
META = "meta.json"
MODEL_FILE = "model.safetensors"
STATE_FILE = "train_state.pt"
DCP_DIR = "dcp"

# DCP warns on every single-process save and load; here they are intended.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")


def capture_rng(device: torch.device) -> dict:
    """Python, NumPy and torch CPU generators, plus the training GPU's when training on CUDA (only then: asking
    for it would open a CUDA context on a GPU machine that trains on the CPU)."""
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
    }


def restore_rng(state: dict, device: torch.device) -> None:
    """The reverse of capture_rng; a GPU state is restored only when training on CUDA again (a checkpoint moved
    between CPU and GPU resumes with the GPU's dropout masks re-seeded)."""
    random.setstate(state["python"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy(), *rest))
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def model_config_json(cfg: ModelConfig) -> dict:
    return {"model_type": "minimind", "tie_word_embeddings": True, "hidden_act": "silu", **cfg.__dict__}


def cpu_copy(tree):
    """Every tensor of a (nested) state dict copied to the CPU, never a view of the live one: training goes on."""
    return tree_map(lambda x: x.detach().to("cpu", copy=True) if isinstance(x, torch.Tensor) else x, tree)


def _tied_copies(model_state: dict) -> set[str]:
    """The names of tensors that share another's storage (the tied lm_head.weight, after embed_tokens.weight):
    safetensors stores each tensor once."""
    seen, tied = set(), set()
    for name, tensor in model_state.items():
        if tensor.data_ptr() in seen:
            tied.add(name)
        seen.add(tensor.data_ptr())
    return tied


def write_weights(model_state: dict, path: Path) -> None:
    save_file({k: v.contiguous() for k, v in model_state.items()}, str(path))


class CheckpointSaver:
    """Writes a run's checkpoints, on every rank: each rank its shard of the weights and optimizer state, rank 0
    the rest; then rank 0 renames the finished directory into place, points `latest` at it, prunes old ones and
    copies it to the mirror directory (train.checkpoint_mirror) if there is one.

    With async_save the state is first copied to CPU memory (the only stall), then written by a background thread
    while training goes on; at most one save is in flight (the next waits for it), and it stays atomic: the
    directory appears, and `latest` moves, only once every file is written and checksummed."""

    def __init__(self, run_dir: Path, keep: int, world: World = World(), async_save: bool = False,
                 mirror: str | Path | None = None):
        self.run_dir, self.keep, self.world = run_dir, keep, world
        self.mirror = Path(mirror) if mirror else None
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="checkpoint") if async_save else None
        self._pending: Future | None = None
        # The background thread's collectives get a group of their own: two threads must never share one.
        self._group = dist.new_group(backend="gloo") if async_save and world.distributed else None

    def save(self, step: int, model: MiniMind, optimizer: torch.optim.Optimizer, cfg: Config, tokenizer: Tokenizer,
             train_state: dict) -> Path:
        self.wait()
        world, ckpt_root = self.world, self.run_dir / CHECKPOINTS_DIR
        final = ckpt_root / f"step_{step:06d}"
        tmp = ckpt_root / f".tmp_{final.name}"
        if world.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        world.barrier()
        try:
            torch.save(capture_rng(world.device), tmp / f"rng_{world.rank:05d}.pt")
            model_state, optimizer_state = get_state_dict(model, optimizer_list(optimizer))
            state = {"model": model_state, "optimizer": optimizer_state}
            tied = _tied_copies(model_state)  # before copying, which unties them
            if world.is_main:
                (tmp / "config.json").write_text(json.dumps(model_config_json(cfg.model), indent=2) + "\n")
                (tmp / "config.toml").write_text(cfg.to_toml())
                tokenizer.save(tmp)
                torch.save(train_state, tmp / STATE_FILE)
        except (OSError, RuntimeError) as e:  # a full disk shows as any of these
            raise _save_failed(e, self.run_dir, final, tmp) from None
        if self._executor is None:
            self._write(state, tied, tmp, final, step, tokenizer.fingerprint)
            world.barrier()  # nobody moves on (or exits) before the checkpoint is complete
        else:
            self._pending = self._executor.submit(self._write, cpu_copy(state), tied, tmp, final, step,
                                                  tokenizer.fingerprint)
        return final

    def _write(self, state: dict, tied: set[str], tmp: Path, final: Path, step: int,
               tokenizer_fingerprint: str) -> None:
        world = self.world
        try:
            dcp.save(state, checkpoint_id=tmp / DCP_DIR, no_dist=not world.distributed, process_group=self._group)
            if not world.distributed:  # the full weights are already here: no consolidation needed
                write_weights({k: v for k, v in state["model"].items() if k not in tied}, tmp / MODEL_FILE)
            if world.is_main:  # dcp.save returned: every rank's shard (and its rng file) is written
                _write_meta(tmp, step, tokenizer_fingerprint)
        except (OSError, RuntimeError, CheckpointException) as e:
            raise _save_failed(e, self.run_dir, final, tmp) from None
        if world.is_main:
            _install(tmp, final)
            write_atomic(self.run_dir / LATEST, f"{CHECKPOINTS_DIR}/{final.name}\n")
            _prune(final.parent, self.keep, protect=final)
            if self.mirror is not None:
                _copy_to_mirror(final, self.mirror, self.keep)

    def wait(self) -> None:
        """Until the save in flight (if any) is complete; raises its failure here, in the training thread."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def close(self) -> None:
        self.wait()
        if self._executor is not None:
            self._executor.shutdown()


def _install(tmp: Path, final: Path) -> None:
    """Rename a finished checkpoint into place; re-saving a step (after resuming from it) swaps, never leaving
    a moment without one."""
    if final.exists():
        stale = final.parent / f".old_{final.name}"
        os.replace(final, stale)
        os.replace(tmp, final)
        shutil.rmtree(stale, ignore_errors=True)
    else:
        os.replace(tmp, final)


def _copy_to_mirror(ckpt: Path, mirror: Path, keep: int) -> None:
    """Copy a completed checkpoint to mirror/checkpoints/ (a run-directory layout, with its own `latest`), the
    same atomic way. A mirror that cannot be written is a warning: the primary checkpoint is complete."""
    root = mirror / CHECKPOINTS_DIR
    tmp = root / f".tmp_{ckpt.name}"
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(ckpt, tmp)
        for f in tmp.rglob("*"):
            if f.is_file():
                fsync_path(f)
        _install(tmp, root / ckpt.name)
        write_atomic(mirror / LATEST, f"{CHECKPOINTS_DIR}/{ckpt.name}\n")
        _prune(root, keep, protect=root / ckpt.name)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        warnings.warn(f"train.checkpoint_mirror: copying {ckpt.name} to {mirror} failed ({e}); the checkpoint in "
                      "the run directory is complete", stacklevel=1)


def _save_failed(error: BaseException, run_dir: Path, target: Path, tmp: Path) -> CheckpointError:
    """The one-line error of a save that could not be written (typically a full disk: torch's zip writer then says
    "unexpected pos"), after removing the partial save; earlier checkpoints and `latest` are untouched."""
    shutil.rmtree(tmp, ignore_errors=True)
    cause = (str(error).strip().splitlines() or [type(error).__name__])[0]
    free = shutil.disk_usage(run_dir).free / 2**20
    last = (run_dir / LATEST).read_text().strip() if (run_dir / LATEST).is_file() else None
    then = (f"the last good checkpoint is {run_dir / last}: free some space, then continue with --resume" if last
            else "no checkpoint of this run was saved before")
    return CheckpointError(f"saving {target} failed ({cause}); the file system of {run_dir} has {free:,.0f} MiB "
                           f"free; the partial save was removed; {then}")


def _write_meta(ckpt: Path, step: int, tokenizer_fingerprint: str, verified: dict | None = None) -> None:
    """fsync every file, then record their checksums in meta.json: its presence marks the checkpoint complete.
    `verified`: checksums of files just verified and left unchanged, not read again."""
    verified = verified or {}
    files = sorted(str(p.relative_to(ckpt)) for p in ckpt.rglob("*") if p.is_file() and p.name != META)
    for f in files:
        fsync_path(ckpt / f)
    meta = {"step": step, "tokenizer_fingerprint": tokenizer_fingerprint,
            "files": {f: verified.get(f) or sha256_file(ckpt / f) for f in files}}
    write_atomic(ckpt / META, json.dumps(meta, indent=2) + "\n")


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
    raise CheckpointError(f"no checkpoint at {path} "
                          f"(expected a run directory with `{LATEST}` or a checkpoint directory)")


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
    """Weights, tokenizer and config of a checkpoint (or a run's latest), verified; a distributed checkpoint's
    weights are gathered from its shards."""
    ckpt = resolve_checkpoint(path)
    verify_checkpoint(ckpt)
    cfg = read_checkpoint_config(ckpt)
    model = MiniMind(cfg.model)
    if (ckpt / MODEL_FILE).is_file():
        missing, unexpected = load_model(model, str(ckpt / MODEL_FILE), strict=False, device=device)
        if missing or unexpected:
            raise CheckpointError(f"{ckpt / MODEL_FILE} does not match its config.json "
                                  f"(missing: {missing[:3]}, unexpected: {unexpected[:3]})")
    elif (ckpt / DCP_DIR).is_dir():
        state = {"model": model.state_dict()}
        _dcp_load(state, ckpt)
        model.load_state_dict(state["model"])
    else:
        raise CheckpointError(f"{ckpt} holds neither {MODEL_FILE} nor {DCP_DIR}/")
    return model.to(device), Tokenizer.load(ckpt), cfg, ckpt


def read_checkpoint_config(ckpt: Path) -> Config:
    return load_config(ckpt / "config.toml")


def load_train_state(ckpt: Path) -> dict:
    return load_weights_only(ckpt / STATE_FILE)


def restore_rng_of_rank(ckpt: Path, world: World = World()) -> bool:
    """Restore this rank's RNG states; False (nothing restored) when another number of ranks saved them."""
    files = sorted(ckpt.glob("rng_*.pt"))
    if len(files) != world.size:
        return False
    restore_rng(load_weights_only(files[world.rank]), world.device)
    return True


def load_weights_and_optimizer(ckpt: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                               world: World = World()) -> None:
    """Called on every rank: load the checkpoint's weights and optimizer state into this run's (possibly sharded)
    model and optimizer, whatever the number of ranks that saved it. The optimizer's hyper-parameters (weight decay,
    betas, Muon's momentum, ...) stay this run's config's: a branch or resume with new settings gets them."""
    if not (ckpt / DCP_DIR).is_dir():
        raise CheckpointError(f"{ckpt} has no {DCP_DIR}/ directory (it was written by an older minipretrain): its "
                              "weights work with generate, eval and export, but training cannot resume from it")
    configured = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    model_state, optimizer_state = get_state_dict(model, optimizer_list(optimizer))
    state = {"model": model_state, "optimizer": optimizer_state}
    _dcp_load(state, ckpt, world)
    set_state_dict(model, optimizer_list(optimizer), model_state_dict=state["model"],
                   optim_state_dict=state["optimizer"])
    for group, settings in zip(optimizer.param_groups, configured, strict=True):
        group.update(settings)  # the saved param_groups carry the settings of the run that saved them


def consolidate(path: str | Path, out: str | Path | None = None) -> Path:
    """Gather a checkpoint's weights into one model.safetensors: inside the checkpoint (out=None), or in a new
    directory `out` with the config and tokenizer (what generate, eval and export need, nothing else)."""
    model, tokenizer, cfg, ckpt = load_model_from_checkpoint(path)
    if out is not None and Path(out) != ckpt:
        return write_model_checkpoint(out, model, cfg, tokenizer, json.loads((ckpt / META).read_text())["step"])
    tmp = ckpt / f".{MODEL_FILE}.tmp"
    save_model(model, str(tmp))
    os.replace(tmp, ckpt / MODEL_FILE)
    meta = json.loads((ckpt / META).read_text())  # verified on load: the shards need not be hashed again
    unchanged = {f: digest for f, digest in meta["files"].items() if f != MODEL_FILE}
    _write_meta(ckpt, meta["step"], tokenizer.fingerprint, unchanged)
    return ckpt


def write_model_checkpoint(out: str | Path, model: MiniMind, cfg: Config, tokenizer: Tokenizer, step: int = 0) -> Path:
    """A weights-only checkpoint directory (model.safetensors, configs, tokenizer, meta.json): what generate, eval
    and export read. Written beside `out` and renamed into place, so a failure leaves nothing half-written; `out`
    must not exist or be empty."""
    with new_directory(out) as tmp:
        save_model(model, str(tmp / MODEL_FILE))
        (tmp / "config.json").write_text(json.dumps(model_config_json(cfg.model), indent=2) + "\n")
        (tmp / "config.toml").write_text(cfg.to_toml())
        tokenizer.save(tmp)
        _write_meta(tmp, step, tokenizer.fingerprint)
    return Path(out)


_DCP_METADATA_ALLOWED = {("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
                         ("torch.serialization", "_get_layout"), ("torch", "Size"),
                         ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"), ("collections", "OrderedDict")}


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP metadata only: its own classes, tensor dtypes and sizes; anything else is refused."""

    def find_class(self, module, name):
        if module == "torch.distributed.checkpoint.metadata":
            import torch.distributed.checkpoint.metadata as metadata

            obj = getattr(metadata, name, None)
            if obj is not None and getattr(obj, "__module__", None) == module:  # defined there, not imported
                return obj
        elif (module, name) in _DCP_METADATA_ALLOWED or (
                module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in checkpoint metadata")


class _SafeReader(FileSystemReader):
    def read_metadata(self, *args, **kwargs):
        try:
            with open(Path(self.path) / ".metadata", "rb") as f:
                metadata = _MetadataUnpickler(f).load()
        except (OSError, pickle.UnpicklingError, EOFError, AttributeError) as e:
            raise CheckpointError(f"{self.path}/.metadata cannot be read: {e}") from None
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def _dcp_load(state: dict, ckpt: Path, world: World = World()) -> None:
    reader = _SafeReader(ckpt / DCP_DIR)
    # Read (and so vet) the index before DCP does: inside dcp.load, torch 2.11 turns the refusal into
    # "AssertionError: metadata is None" instead of our one-line error.
    reader.read_metadata()
    try:
        dcp.load(state, storage_reader=reader, no_dist=not world.distributed)
    except CheckpointException as e:  # DCP gathers every rank's failure into one exception
        causes = sorted({str(failure[0]).splitlines()[0] for failure in e.failures.values()})
        raise CheckpointError(f"{ckpt / DCP_DIR} cannot be loaded: {'; '.join(causes)}") from None
