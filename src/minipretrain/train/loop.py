"""The story of a training run: set up, then step until max_steps, logging, validating, sampling and saving.

    summary = train(load_config("configs/tiny.toml"), "runs/demo")
    summary = train(cfg, "runs/demo", resume=True)      # continue exactly where the last checkpoint left off
    summary = train(cfg, "runs/decay", branch_from="runs/demo/checkpoints/step_000400")   # a new run from there

Under torchrun every rank runs this same story on its part of each global batch (see parallel/); rank 0 alone
logs and writes files, every rank takes part in the collective steps (validation, samples, checkpoints).
"""

from __future__ import annotations

import json
import random
import shutil
import sys
import time
from contextlib import ExitStack
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from minipretrain import moe
from minipretrain.config import Config, ModelConfig
from minipretrain.data.dataset import RUN_DATA_DIR, check_objective_tokenizer, load_run_data
from minipretrain.data.prefetch import StepLoader
from minipretrain.errors import CheckpointError, Preempted, UserError
from minipretrain.evaluate import combine_results, evaluate, token_byte_lengths
from minipretrain.fileio import DirectoryLock
from minipretrain.generate import complete
from minipretrain.model import MiniMind
from minipretrain.parallel import (
    Pipeline,
    World,
    apply_activation_checkpointing,
    check_parallel_precision,
    compile_blocks,
    init_distributed,
    parallelize,
)
from minipretrain.plots import PLOT_FILE, write_run_plot
from minipretrain.precision import (
    configure_device,
    load_scaler_state,
    mixed_precision,
    request_deterministic_cublas,
    resolve_precision,
)
from minipretrain.tokenizer import Tokenizer
from minipretrain.train import checkpoint as ckpt_io
from minipretrain.train.metrics import MetricsLog
from minipretrain.train.optim import build_optimizer, set_learning_rate
from minipretrain.train.preemption import SaveTimer, StopSignals
from minipretrain.train.schedule import lr_at, steps_for_epochs
from minipretrain.train.stability import CODE, REBASELINED, Snapshot, SpikeGuard
from minipretrain.train.step import StepWindow, accumulate_gradients, finish_step, unscale_and_clip
from minipretrain.train.trackers import TRACKER_DIRS, TRACKERS_FILE, Trackers, check_loggers

RUN_FILES = ("metrics.jsonl", "samples.txt", "summary.json", "config.toml", "tokenizer", RUN_DATA_DIR,
             ckpt_io.LATEST, ckpt_io.CHECKPOINTS_DIR, TRACKERS_FILE, *TRACKER_DIRS, PLOT_FILE)


def log(message: str) -> None:
    tqdm.write(message)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _verified_checkpoint(source: Path) -> Path:
    ckpt = ckpt_io.resolve_checkpoint(source)
    try:
        ckpt_io.verify_checkpoint(ckpt)
    except CheckpointError as e:
        earlier = [str(p) for p in ckpt_io.complete_checkpoints(ckpt.parent) if p != ckpt]
        hint = f"; earlier checkpoints: {', '.join(earlier)} (resume one with --resume PATH)" if earlier else ""
        raise CheckpointError(f"{e}{hint}") from None
    return ckpt


def _prepare_run_dir(run_dir: Path, resume: bool | str, overwrite: bool, mirror: str | None = None) -> Path | None:
    """The checkpoint to resume from, or None for a fresh run. Never silently restarts or clobbers a run. A run
    whose own latest checkpoint is missing or corrupt resumes from its mirror's (train.checkpoint_mirror)."""
    if resume:
        if resume is not True:
            return _verified_checkpoint(Path(resume))
        try:
            if not (run_dir / ckpt_io.LATEST).exists() and not ckpt_io.list_checkpoints(run_dir):
                raise CheckpointError(f"nothing to resume in {run_dir}: it has no checkpoint; "
                                      "run without --resume to start")
            return _verified_checkpoint(run_dir)
        except CheckpointError as e:
            if mirror is None or not (Path(mirror) / ckpt_io.LATEST).is_file():
                raise
            ckpt = _verified_checkpoint(Path(mirror))
            log(f"{e}\nresuming from the mirror's copy instead: {ckpt}")
            return ckpt
    existing = [name for name in (ckpt_io.LATEST, ckpt_io.CHECKPOINTS_DIR) if (run_dir / name).exists()]
    mirrored = mirror is not None and (Path(mirror) / ckpt_io.LATEST).exists()  # a mirror another run fills
    if (existing or mirrored) and not overwrite:
        holder = f"{run_dir} already holds a run ({', '.join(existing)})" if existing else \
            f"train.checkpoint_mirror={mirror} already holds a run's checkpoints"
        raise UserError(f"{holder}: pass --resume to continue it, --overwrite to start over, or choose another "
                        f"{'--run-dir' if existing else 'mirror'}")
    targets = [run_dir / name for name in RUN_FILES] if existing else []
    targets += [Path(mirror) / ckpt_io.LATEST, Path(mirror) / ckpt_io.CHECKPOINTS_DIR] if mirrored else []
    for target in targets:
        shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
    return None


def _check_same_model(saved: ModelConfig, current: ModelConfig, ckpt: Path, action: str = "resume from") -> None:
    diffs = [f"model.{k} is {v!r} in the checkpoint but {getattr(current, k)!r} now"
             for k, v in asdict(saved).items() if getattr(current, k) != v]
    if diffs:
        raise CheckpointError(f"cannot {action} {ckpt} with a different model: {'; '.join(diffs)}")


def _same_path(a: str | Path, b: str | Path) -> bool:
    return Path(a).resolve() == Path(b).resolve()


def _check_resumable(ckpt: Path, cfg: Config) -> dict:
    """The checkpoint's training state, if this config can continue it (same model and optimizer, steps left)."""
    saved = ckpt_io.read_checkpoint_config(ckpt)
    _check_same_model(saved.model, cfg.model, ckpt)
    if saved.optim.name != cfg.optim.name:  # their states hold different tensors (Adam moments, Muon momentum)
        raise CheckpointError(f"cannot resume from {ckpt} with optim.name={cfg.optim.name}: it was trained with "
                              f"{saved.optim.name}; resume with --set optim.name={saved.optim.name}, or start a new "
                              "run from its weights with train.init_from")
    state = ckpt_io.load_train_state(ckpt)
    if cfg.train.epochs is None:  # before the trackers continue their runs, and before the data work
        _check_steps_left(state["step"], cfg.train.max_steps, ckpt)
    return state


def _check_steps_left(step: int, max_steps: int, ckpt: Path) -> None:
    if step >= max_steps:
        raise UserError(f"{ckpt} is already at step {step} >= train.max_steps={max_steps}: raise it "
                        f"(--set train.max_steps=N, or train.epochs) to train further")


def _resolve_epochs(cfg: Config, rows: int, dp_size: int, say) -> Config:
    """train.epochs turned into train.max_steps, now that the training rows are known. The resolved config (steps,
    no epochs) is what the run records, so a resume goes on to the same step whatever the data does."""
    t = cfg.train
    per_step = t.batch_size * t.grad_accum * dp_size
    steps = steps_for_epochs(t.epochs, rows, per_step)
    say(f"train.epochs={t.epochs:g}: {rows:,} training rows / {per_step:,} rows per step (batch {t.batch_size} x "
        f"accumulation {t.grad_accum} x {dp_size} data-parallel) x {t.epochs:g} = {steps:,} steps")
    return replace(cfg, train=replace(t, max_steps=steps, epochs=None))


def _init_checkpoint(cfg: Config, resume) -> Path | None:
    """train.init_from's checkpoint, verified and with the same model config, for a fresh run; None otherwise (a
    resumed run continues from its own checkpoint)."""
    if resume or cfg.train.init_from is None:
        return None
    try:
        ckpt = ckpt_io.resolve_checkpoint(cfg.train.init_from)
        ckpt_io.verify_checkpoint(ckpt)
    except CheckpointError as e:
        raise CheckpointError(f"train.init_from: {e}") from None
    _check_same_model(ckpt_io.read_checkpoint_config(ckpt).model, cfg.model, ckpt, "start from")
    return ckpt


def _rewind_samples(path: Path, step: int) -> None:
    """Drop the samples written after `step` (a resumed run writes them again), as MetricsLog does for metrics."""
    if not path.exists():
        return
    blocks = path.read_text(encoding="utf-8").split("--- step ")
    kept = [b for b in blocks[1:] if int(b.split("\n", 1)[0]) <= step]
    path.write_text("".join("--- step " + b for b in kept), encoding="utf-8")


def train(cfg: Config, run_dir: str | Path, resume: bool | str = False, overwrite: bool = False,
          show_progress: bool = True, branch_from: str | Path | None = None) -> dict:
    """branch_from: a checkpoint (or run) whose whole state (weights, optimizer, step, data position, RNG) a new
    run in `run_dir` continues with `cfg`'s schedule and data (e.g. a WSD decay phase); the original is untouched."""
    if cfg.train.deterministic:
        request_deterministic_cublas()  # before anything touches CUDA
    check_loggers(cfg.train.loggers)  # a missing tracker package fails before any work
    world = init_distributed(cfg.parallel, cfg.train.device)
    trackers = Trackers()  # started once the run directory and the resume step are known
    try:
        with ExitStack() as held:  # the run directory's lock, released however the run ends
            summary = _train(cfg, Path(run_dir), resume, overwrite, show_progress, world, trackers, held,
                             branch_from)
    except Preempted:  # every rank saved together: a clean, resumable end
        trackers.close()
        world.close()
        raise
    except BaseException:
        trackers.close(failed=True)
        raise
    trackers.close()
    world.close()  # not on failure: peers may still wait in a collective, and torchrun stops them anyway
    return summary


def _load_data(cfg: Config, run_dir: Path, checkpoint_tokenizer: Tokenizer | None, show_progress: bool, say,
               world: World):
    """Rank 0 trains the tokenizer and prepares raw sources while the others wait; then they load what it wrote."""
    if world.is_main:
        data = load_run_data(cfg, run_dir, checkpoint_tokenizer, show_progress, say)
        if world.distributed:
            data.tokenizer.save(run_dir / "tokenizer")
    world.barrier()
    if not world.is_main:
        data = load_run_data(cfg, run_dir, checkpoint_tokenizer or Tokenizer.load(run_dir / "tokenizer"),
                             False, say, verify_shards=False)
    return data


def _train(cfg: Config, run_dir: Path, resume: bool | str, overwrite: bool, show_progress: bool, world: World,
           trackers: Trackers, held: ExitStack, branch_from: str | Path | None = None) -> dict:
    t, main = cfg.train, world.is_main
    say = log if main else (lambda message: None)
    show_progress = show_progress and main
    device = world.device
    precision = resolve_precision(t.dtype, device)  # before the run directory is touched: a refusal loses nothing
    amp_dtype = precision.dtype
    check_parallel_precision(world, cfg.parallel, amp_dtype)
    if resume and branch_from:
        raise UserError("--resume continues a run in its own directory, --branch-from starts a new one from "
                        "another run's checkpoint: pass one of them")
    if not resume and not branch_from:
        check_objective_tokenizer(cfg)  # also before the run directory is touched
    init_ckpt = _init_checkpoint(cfg, resume or branch_from)  # and this
    branch_ckpt = None
    if branch_from:  # and this
        branch_ckpt = world.broadcast(_verified_checkpoint(Path(branch_from)) if main else None)
        if run_dir.resolve() in branch_ckpt.resolve().parents:
            raise UserError(f"--branch-from {branch_from} is inside --run-dir {run_dir}: a branch starts a new run "
                            "directory and leaves the original untouched")
        source_mirror = ckpt_io.read_checkpoint_config(branch_ckpt).train.checkpoint_mirror
        if source_mirror and t.checkpoint_mirror and _same_path(t.checkpoint_mirror, source_mirror):
            raise UserError(f"train.checkpoint_mirror={t.checkpoint_mirror} is the branched run's mirror: give the "
                            "branch a mirror of its own (--set train.checkpoint_mirror=DIR)")
        state = _check_resumable(branch_ckpt, cfg)  # before --overwrite deletes anything
    locked = main and (not resume or run_dir.is_dir())  # rank 0 holds it; a --resume of nothing is refused below
    if locked:
        held.enter_context(DirectoryLock(run_dir))  # before anything in the run directory is read or deleted
    ckpt = world.broadcast(_prepare_run_dir(run_dir, resume, overwrite, t.checkpoint_mirror) if main else None)
    ckpt = ckpt or branch_ckpt
    state = _check_resumable(ckpt, cfg) if ckpt is not None else None
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        if not locked:  # resumed from the mirror into a run directory that was missing: lock it now
            held.enter_context(DirectoryLock(run_dir))
        # Before the data work, so that a tracker that cannot start (no login, no network) fails fast.
        trackers.start(cfg, run_dir, state["step"] if state else 0)
    configure_device(device, t.deterministic)
    seed_everything(t.seed)  # the same initial weights on every rank

    weights_from = ckpt or init_ckpt  # its tokenizer is the model's
    data = _load_data(cfg, run_dir, Tokenizer.load(weights_from) if weights_from else None, show_progress, say,
                      world)
    tokenizer, batches, val_sets, fim_val_sets = data.tokenizer, data.sampler, data.val_sets, data.fim_val_sets
    if t.epochs is not None:
        cfg = _resolve_epochs(cfg, sum(len(rows) for rows in batches.rows), world.dp_size, say)
        t = cfg.train
        if state is not None:
            _check_steps_left(state["step"], t.max_steps, ckpt)
    if main:
        (run_dir / "config.toml").write_text(cfg.to_toml())

    model = MiniMind(cfg.model).to(device)
    if init_ckpt is not None:  # the full weights on every rank, before parallelize shards or splits them
        model.load_state_dict(ckpt_io.load_model_from_checkpoint(init_ckpt)[0].state_dict())
        say(f"initialized from {init_ckpt}: its weights, a fresh optimizer and schedule from step 0")
    total, active = model.num_parameters(), model.num_active_parameters()
    apply_activation_checkpointing(model, t.activation_checkpointing)  # before parallelize wraps the blocks
    compile_model = t.compile if t.compile is not None else device.type == "cuda"
    if compile_model:
        compile_blocks(model)  # block by block, before wrapping: the same compiled code under every layout
    # model: this rank's parameters (all of them, or its pipeline stages'); step_model runs the training forward.
    model, step_model = parallelize(model, world, cfg.parallel, amp_dtype, t.grad_accum)
    pipeline = step_model if isinstance(step_model, Pipeline) else None
    if world.dp_rank or world.pp_rank:  # replicas and pipeline stages draw their own dropout masks; tensor-parallel
        seed_everything(t.seed + world.dp_rank + 7919 * world.pp_rank)  # peers (one layer's halves) the same ones
    say(f"model: {_model_size(total, active)} on {device.type} ({precision.name}; {precision.reason})"
        f"{_layout(world, cfg)}{'; blocks compiled with torch.compile' if compile_model else ''}")
    optimizer = build_optimizer(model, cfg.optim, device.type)
    autocast, scaler = mixed_precision(device, amp_dtype)
    token_bytes = token_byte_lengths(tokenizer, cfg.model.vocab_size)

    step, tokens, elapsed_before = 0, 0, 0.0
    guard = SpikeGuard(cfg.guard, cfg.optim.warmup_steps, device)
    if state is not None:
        ckpt_io.load_weights_and_optimizer(ckpt, model, optimizer, world)
        load_scaler_state(scaler, state["scaler"])
        carried = batches.load_state_dict(state["data"], carry_over=branch_ckpt is not None)
        if carried is not None:
            say(f"the data differs from the branched run's: {', '.join(carried) or 'no source'} continue(s) "
                f"where it was, the others start at their beginning, and the mixture weights apply from here")
        if "guard" in state:  # absent in checkpoints of earlier versions
            guard.load_state_dict(state["guard"])
        step, tokens, elapsed_before = state["step"], state["tokens"], state["elapsed"]
        if not ckpt_io.restore_rng_of_rank(ckpt, world):
            # Only dropout draws from these; the data order is the sampler's and continues exactly.
            seed_everything(t.seed + 1_000_003 * step + world.dp_rank)
            say(f"the checkpoint was saved by another number of processes than this run's {world.size}: random "
                "number generators re-seeded (dropout masks differ from an uninterrupted run)")
        say(f"{'branched' if branch_ckpt else 'resumed'} from {ckpt} at step {step} ({tokens:,} tokens)")
    metrics = MetricsLog(run_dir / "metrics.jsonl", resume_step=step, trackers=trackers) if main else None
    if main:
        _rewind_samples(run_dir / "samples.txt", step)

    # Batches one step ahead in a thread; the data position checkpoints record is the last trained step's.
    loader = StepLoader(batches, t.batch_size, t.grad_accum, world.dp_rank, world.dp_size, model.causal,
                        pin_memory=device.type == "cuda")
    held.callback(loader.close)
    data_state, drawn = batches.state_dict(), list(batches.drawn)
    snapshot = Snapshot() if cfg.guard.action == "rollback" else None  # what a rollback restores
    save_timer = SaveTimer(t.save_every_minutes)
    saver = ckpt_io.CheckpointSaver(run_dir, t.keep_checkpoints, world, t.async_save, t.checkpoint_mirror)
    held.callback(saver.close)  # a save in flight completes, whatever ends the run

    def save():
        train_state = {
            "step": step, "tokens": tokens, "elapsed": elapsed(), "scaler": scaler.state_dict(),
            "data": data_state, "guard": guard.state_dict(),
        }
        saved = saver.save(step, model, optimizer, cfg, tokenizer, train_state)
        save_timer.reset()
        if snapshot is not None:
            snapshot.take(step, model, optimizer, scaler, drawn)
        if main:
            write_run_plot(run_dir)  # never fails training: a plotting error is a warning
        return saved

    def log_event(record: dict, message: str) -> None:
        if main:
            metrics.write(record)
        say(message)

    def spans(before: list[int], after: list[int]) -> dict:
        """The draws of each source between two data positions: which samples an event concerns."""
        return {name: [b, a] for name, b, a in zip(batches.names, before, after, strict=True) if a > b}

    def handle_bad_step(at: int, reason: str, loss: float, grad_norm: float, draws: dict, rebaselined: bool) -> bool:
        """The spike guard's action on step `at`, whose update was not applied (see train/stability.py); True when
        it rolled back."""
        record = {"step": at, "loss": loss, "grad_norm": grad_norm, "reason": reason, "draws": draws}
        if cfg.guard.action == "stop":
            log_event({**record, "event": "stopped"}, f"step {at}: {reason}")
            last = (run_dir / ckpt_io.LATEST).read_text().strip() if (run_dir / ckpt_io.LATEST).is_file() else None
            then = f"continue from {run_dir / last} with --resume" if last else "start again"
            raise UserError(f"step {at}: {reason}: training diverged (guard.action=stop); lower optim.lr or raise "
                            f"optim.warmup_steps, then {then}")
        event = guard.record_spike(at, loss, draws)
        log_event({**record, "event": event}, f"step {at}: {reason}: update skipped")
        if rebaselined:
            guard.counts["rebaseline"] += 1
            log_event({"step": at, "event": "rebaseline"},
                      f"step {at}: {cfg.guard.max_spikes} spikes in a row: taken as a new level, not a spike; the "
                      f"guard's running statistics start again from here")
        if not guard.wants_rollback():
            return False
        if not guard.rolled_back(step):
            raise UserError(f"step {at}: {guard.counts['rollback']} rollbacks did not stop the loss spikes "
                            f"(guard.max_rollbacks={cfg.guard.max_rollbacks}): lower optim.lr or check the data, "
                            f"then continue from the last checkpoint with --resume")
        snapshot.restore(model, optimizer, scaler)
        skipped = spans(snapshot.draws, drawn)
        log_event({"step": step, "event": "rollback", "to_step": snapshot.step, "draws": skipped,
                   "lr_factor": cfg.guard.lr_factor, "lr_until": guard.lr_scaled_until},
                  f"step {step}: {cfg.guard.max_spikes} spikes within {cfg.guard.window} steps: rolled back to the "
                  f"weights of step {snapshot.step}, skipping the data in between"
                  + (f"; learning rate x{cfg.guard.lr_factor:g} until step {guard.lr_scaled_until}"
                     if cfg.guard.lr_factor != 1 else ""))
        return True

    def evaluate_sets(sets: dict) -> dict:
        return {name: evaluate(pipeline or model, rows, t.batch_size, token_bytes, t.eval_batches, str(device),
                               autocast, world=world) for name, rows in sets.items()}

    def validate() -> dict:  # every rank evaluates (FSDP, tensor- and pipeline-parallel forwards are collective)
        by_source = evaluate_sets(val_sets)
        result = combine_results(list(by_source.values()))
        record = {"step": step, "val_loss": result["loss"], "val_perplexity": result["perplexity"]}
        if model.causal:  # bits per byte: a compression rate, which only a left-to-right loss is
            record["val_bpb"] = result["bits_per_byte"]
            scores = f"ppl {result['perplexity']:.2f}, {result['bits_per_byte']:.4f} bits/byte"
        else:  # masked LM: loss, perplexity and accuracy on the chosen tokens
            record["val_accuracy"] = result["accuracy"]
            scores = f"ppl {result['perplexity']:.2f}, accuracy {result['accuracy']:.4f} on masked tokens"
        if fim_val_sets:
            record["val_fim_loss"] = combine_results(list(evaluate_sets(fim_val_sets).values()))["loss"]
            scores += f"; loss on middles {record['val_fim_loss']:.4f}"
        per_source = ""
        if len(by_source) > 1:
            record["val_loss_by_source"] = {name: r["loss"] for name, r in by_source.items()}
            per_source = " (" + ", ".join(f"{name} {r['loss']:.4f}" for name, r in by_source.items()) + ")"
        if main:
            metrics.write(record)
        say(f"step {step}: val loss {result['loss']:.4f}{per_source}, {scores}")
        return record

    def sample():
        if not model.causal:
            say(f"step {step}: no sample: a masked LM does not generate text (`minipretrain fill-mask` fills masks)")
            return None
        if pipeline is not None:
            say(f"step {step}: no sample under pipeline parallelism (each rank holds part of the model): "
                "`minipretrain generate --ckpt RUN` samples from the checkpoint")
            return None
        generator = torch.Generator(device=device).manual_seed(t.seed)  # never touches the training RNG
        # Eager: decoding with a growing KV cache would recompile the compiled blocks for shape after shape.
        with autocast, torch.compiler.set_stance("force_eager"):
            text = complete(model, tokenizer, t.sample_prompt, t.sample_tokens, generator=generator, device=device)
        if main:
            with open(run_dir / "samples.txt", "a", encoding="utf-8") as f:
                f.write(f"--- step {step}\n{text}\n")
        say(f"step {step} sample: {text[:300]!r}")
        return text

    def read_pending() -> list[dict]:
        """Read the pending steps' numbers back from the device (one synchronisation for the window), act on the
        spike guard's verdicts in step order, and return the metrics lines of the log steps among them. After a
        rollback the rest of the window is not judged: it was trained on the weights the rollback dropped."""
        lines = []
        for n in window.read():
            reason = guard.reason(n.verdict)
            if reason is not None:
                if handle_bad_step(n.step, reason, n.loss, n.grad_norm, spans(n.drawn_before, n.drawn_after),
                                   bool(n.verdict[REBASELINED])):
                    break
                continue
            losses.append(n.loss)
            if n.step % t.log_every == 0 or n.step == t.max_steps:
                line = {"step": n.step, "loss": n.loss, "lr": n.lr, "grad_norm": n.grad_norm,
                        "tokens": tokens - (step - n.step) * tokens_per_step}
                if n.balance is not None:
                    line.update(aux_loss=n.aux_loss, expert_balance=round(n.balance, 4))
                if len(batches.names) > 1:
                    line["tokens_by_source"] = n.tokens_by_source
                lines.append(line)
        return lines

    start = time.perf_counter()

    def elapsed():
        return elapsed_before + time.perf_counter() - start

    tokens_per_step = t.batch_size * t.seq_len * t.grad_accum * world.dp_size  # global
    if snapshot is not None:
        snapshot.take(step, model, optimizer, scaler, drawn)
    first_val = validate() if val_sets and step == 0 else None
    last_val, losses = first_val, []
    first_step = step
    window_steps, window_time, window_wait, session_time = 0, 0.0, 0.0, 0.0  # time in steps only, not eval or saving
    window = StepWindow()  # the steps whose numbers are still on the device
    # Redirected to a file, the bar would write a line per step: refresh it every 30 s instead.
    bar = tqdm(total=t.max_steps, initial=step, desc="train", unit="step", disable=not show_progress,
               dynamic_ncols=True, mininterval=0.1 if sys.stderr.isatty() else 30)
    signals = held.enter_context(StopSignals())
    not_counted = pipeline.norm_excluded if pipeline is not None else ()
    try:
        while step < t.max_steps:
            step_start, waited = time.perf_counter(), loader.wait_s
            lr = lr_at(step, cfg.optim, t.max_steps) * guard.lr_scale(step + 1)
            set_learning_rate(optimizer, lr, cfg.optim)
            data = loader.next()
            # Nothing in here reads a number back from the device (train/step.py): a GPU runs ahead of Python.
            step_loss, aux_loss = accumulate_gradients(step_model, data.micro_batches, autocast, scaler, world,
                                                       model.causal, data.target_counts)
            if pipeline is not None:
                pipeline.sync_tied_gradients()
            grad_norm = unscale_and_clip(model, optimizer, scaler, cfg.optim.grad_clip, world, not_counted)
            verdict = guard.check(step + 1, step_loss, grad_norm, check_grad_finite=not scaler.is_enabled())
            world.max_over_ranks_(verdict[CODE : CODE + 1])  # every rank drops the same updates, for one reason
            bad = verdict[CODE] > 0
            finish_step(optimizer, scaler, skip=bad)
            # A dropped update leaves the routers' balancing biases alone too.
            balance = moe.end_of_step(model, world, cfg.model.router_bias_update_rate, applied=~bad)
            guard.update(verdict)
            step += 1
            tokens += tokens_per_step
            data_state, drawn = data.state, data.drawn_after
            window.add(step, lr, step_loss, aux_loss, grad_norm, verdict, balance, data)
            bar.update(1)
            evaluating = bool(val_sets and t.eval_every and step % t.eval_every == 0 and step < t.max_steps)
            sampling = bool(t.sample_every and step % t.sample_every == 0 and step < t.max_steps)
            saving = bool(t.save_every and step % t.save_every == 0 and step < t.max_steps)
            # Host flags every step (under torchrun over gloo: it never waits for the device); then the one
            # read-back of the window, at log lines and before whatever needs the step's numbers.
            stop, save_due = world.any_rank([signals.received is not None, save_timer.due()])
            pending_log: list[dict] = []
            if (step % t.log_every == 0 or step == t.max_steps or evaluating or sampling or saving or stop
                    or save_due):
                pending_log = read_pending()
            step_time = time.perf_counter() - step_start
            window_steps += 1
            window_time += step_time
            window_wait += loader.wait_s - waited
            session_time += step_time
            if step == first_step + 1 and compile_model:
                say(f"step {step} took {step_time:.1f}s, compiling the blocks included")
            for log_record in pending_log:
                tokens_per_s = window_steps * tokens_per_step / max(window_time, 1e-9)
                log_record.update(elapsed=round(elapsed(), 3), tokens_per_s=round(tokens_per_s, 1),
                                  data_wait_s=round(window_wait / window_steps, 6))
                if main:
                    metrics.write(log_record)
                bar.set_postfix_str(f"loss {log_record['loss']:.4f} lr {log_record['lr']:.2e} {tokens_per_s:,.0f} "
                                    "tok/s", refresh=False)
                window_steps, window_time, window_wait = 0, 0.0, 0.0
            if evaluating:
                last_val = validate()
            if sampling:
                sample()
            if stop and step < t.max_steps:  # at the last step the run ends (and saves) anyway
                saved = save()
                saver.wait()
                log_event({"step": step, "event": "preempted", "signal": signals.received or "another rank's"},
                          f"step {step}: stopped by {signals.received or 'a signal to another rank'}; saved {saved}")
                raise Preempted(f"stopped by {signals.received or 'a signal to another rank'} at step {step}; "
                                f"checkpoint {saved} saved: continue with --resume")
            if (saving or save_due) and step < t.max_steps:
                save()
    finally:
        bar.close()
        loader.close()

    if val_sets:
        last_val = validate()
    final_ckpt = save()  # before sampling: a failure while sampling must not cost the final checkpoint
    saver.wait()
    sample_text = sample()
    total_time = elapsed()
    summary = {
        "steps": step, "tokens": tokens, "elapsed_s": round(total_time, 1),
        "tokens_per_s": round((step - first_step) * tokens_per_step / max(session_time, 1e-9), 1),
        "data_wait_fraction": round(loader.wait_s / max(session_time, 1e-9), 6),
        "final_train_loss": float(np.mean(losses[-10:])) if losses else None,
        "first_val_loss": first_val["val_loss"] if first_val else None,
        "final_val_loss": last_val["val_loss"] if last_val else None,
        "final_val_bpb": last_val.get("val_bpb") if last_val else None,
        "checkpoint": str(final_ckpt), "sample": sample_text, "guard": guard.summary(),
    }
    for key in ("val_accuracy", "val_fim_loss"):  # masked LM, fill-in-the-middle
        if last_val and key in last_val:
            summary[f"final_{key}"] = last_val[key]
    if not main:
        return summary
    metrics.close()
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    val_text = (f"val loss {summary['first_val_loss']:.4f} -> {summary['final_val_loss']:.4f}"
                if first_val and last_val else "")
    events = ", ".join(f"{n} {event.replace('_', ' ')}" for event, n in guard.summary().items() if n)
    log(f"done: {step} steps, {tokens:,} tokens in {total_time:.0f}s; train loss {summary['final_train_loss']:.4f}"
        f"{'; ' + val_text if val_text else ''}{'; spike guard: ' + events if events else ''}; checkpoint {final_ckpt}")
    return summary


def _model_size(total: int, active: int) -> str:
    return f"{total / 1e6:.2f}M parameters" + (f" ({active / 1e6:.2f}M active per token)" if active < total else "")


def _layout(world: World, cfg: Config) -> str:
    if world.size == 1:
        return "; FSDP2 offloading to the CPU in one process" if world.distributed else ""
    pipeline = (f", pipeline parallel x {world.pp_size} ({cfg.parallel.pp_schedule})" if world.pp_size > 1 else "")
    data = f"{cfg.parallel.mode} data parallel x {world.dp_size}" if world.dp_size > 1 else "no data parallelism"
    return f"; {world.size} processes, {data}, tensor parallel x {world.tp_size}{pipeline}"
