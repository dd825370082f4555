"""The story of a training run: set up, then step until max_steps, logging, validating, sampling and saving.

    summary = train(load_config("configs/tiny.toml"), "runs/demo")
    summary = train(cfg, "runs/demo", resume=True)      # continue exactly where the last checkpoint left off

Under torchrun every rank runs this same story on its part of each global batch (see parallel.py); rank 0 alone
logs and writes files, every rank takes part in the collective steps (validation, samples, checkpoints).
"""

from __future__ import annotations

import json
import math
import random
import shutil
import sys
import time
from contextlib import ExitStack
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from minipretrain import moe
from minipretrain.config import Config, ModelConfig
from minipretrain.data.dataset import RUN_DATA_DIR, check_objective_tokenizer, load_run_data
from minipretrain.errors import CheckpointError, UserError
from minipretrain.evaluate import combine_results, evaluate, token_byte_lengths
from minipretrain.fileio import DirectoryLock
from minipretrain.generate import complete
from minipretrain.model import MiniMind, prediction_targets
from minipretrain.parallel import (
    World,
    check_parallel_precision,
    clip_grad_norm,
    gradient_sync,
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
from minipretrain.train.optim import build_optimizer
from minipretrain.train.schedule import lr_at
from minipretrain.train.trackers import TRACKER_DIRS, TRACKERS_FILE, Trackers, check_loggers

RUN_FILES = ("metrics.jsonl", "samples.txt", "summary.json", "config.toml", "tokenizer", RUN_DATA_DIR,
             ckpt_io.LATEST, ckpt_io.CHECKPOINTS_DIR, TRACKERS_FILE, *TRACKER_DIRS, PLOT_FILE)


def log(message: str) -> None:
    tqdm.write(message)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _prepare_run_dir(run_dir: Path, resume: bool | str, overwrite: bool) -> Path | None:
    """The checkpoint to resume from, or None for a fresh run. Never silently restarts or clobbers a run."""
    if resume:
        source = run_dir if resume is True else Path(resume)
        if resume is True and not (run_dir / ckpt_io.LATEST).exists() and not ckpt_io.list_checkpoints(run_dir):
            raise CheckpointError(f"nothing to resume in {run_dir}: it has no checkpoint; "
                                  "run without --resume to start")
        ckpt = ckpt_io.resolve_checkpoint(source)
        try:
            ckpt_io.verify_checkpoint(ckpt)
        except CheckpointError as e:
            earlier = [str(p) for p in ckpt_io.complete_checkpoints(ckpt.parent) if p != ckpt]
            hint = f"; earlier checkpoints: {', '.join(earlier)} (resume one with --resume PATH)" if earlier else ""
            raise CheckpointError(f"{e}{hint}") from None
        return ckpt
    existing = [name for name in (ckpt_io.LATEST, ckpt_io.CHECKPOINTS_DIR) if (run_dir / name).exists()]
    if existing:
        if not overwrite:
            raise UserError(f"{run_dir} already holds a run ({', '.join(existing)}): pass --resume to continue it, "
                            "--overwrite to start over, or choose another --run-dir")
        for name in RUN_FILES:
            target = run_dir / name
            shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
    return None


def _check_same_model(saved: ModelConfig, current: ModelConfig, ckpt: Path, action: str = "resume from") -> None:
    diffs = [f"model.{k} is {v!r} in the checkpoint but {getattr(current, k)!r} now"
             for k, v in asdict(saved).items() if getattr(current, k) != v]
    if diffs:
        raise CheckpointError(f"cannot {action} {ckpt} with a different model: {'; '.join(diffs)}")


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


def accumulate_gradients(step_model, micro_batches, autocast, scaler, world: World | None = None,
                         causal: bool = True) -> tuple[float, float]:
    """Forward and backward over this rank's micro-batches of a step; returns the step's mean loss over all ranks
    and its MoE balancing loss (0 for a dense model).

    Each micro-batch is weighted by its share of the global step's predicted tokens (the balancing loss, a mean
    over sequences, by its share of rows), so accumulating over micro-steps and ranks equals one big batch even
    when padding makes micro-batches unequal. `causal`: the model's attention, which decides what it predicts."""
    world = World() if world is None else world
    counts = [int((prediction_targets(batch.labels, causal) != -100).sum()) for batch in micro_batches]
    total_count, total_rows = world.sum_over_dp([sum(counts), sum(len(batch.inputs) for batch in micro_batches)])
    step_loss = step_aux = 0.0
    for i, (batch, count) in enumerate(zip(micro_batches, counts, strict=True)):
        batch = batch.to(world.device)
        with gradient_sync(step_model, last_micro_step=i == len(micro_batches) - 1):
            with autocast:
                out = step_model(batch.inputs, labels=batch.labels, doc_ids=batch.doc_ids)
                loss = out.loss * (count / max(total_count, 1))
                aux = out.aux_loss * (len(batch.inputs) / total_rows) if out.aux_loss is not None else None
            # DDP and FSDP average gradients over the data-parallel ranks: scaling by their number turns that
            # average into the sum, i.e. the mean over every predicted token of the global batch.
            scaler.scale((loss if aux is None else loss + aux) * world.dp_size).backward()
        step_loss += loss.item()
        step_aux += aux.item() if aux is not None else 0.0
    return tuple(world.sum_over_dp([step_loss, step_aux]))


def apply_gradients(model, optimizer, scaler, grad_clip: float) -> float:
    """Unscale, clip (0 = no clipping), step, clear; returns the global gradient norm before clipping."""
    scaler.unscale_(optimizer)
    grad_norm = clip_grad_norm(model.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


def train(cfg: Config, run_dir: str | Path, resume: bool | str = False, overwrite: bool = False,
          show_progress: bool = True) -> dict:
    if cfg.train.deterministic:
        request_deterministic_cublas()  # before anything touches CUDA
    check_loggers(cfg.train.loggers)  # a missing tracker package fails before any work
    world = init_distributed(cfg.parallel, cfg.train.device)
    trackers = Trackers()  # started once the run directory and the resume step are known
    try:
        with ExitStack() as held:  # the run directory's lock, released however the run ends
            summary = _train(cfg, Path(run_dir), resume, overwrite, show_progress, world, trackers, held)
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
           trackers: Trackers, held: ExitStack) -> dict:
    t, main = cfg.train, world.is_main
    say = log if main else (lambda message: None)
    show_progress = show_progress and main
    device = world.device
    precision = resolve_precision(t.dtype, device)  # before the run directory is touched: a refusal loses nothing
    amp_dtype = precision.dtype
    check_parallel_precision(world, cfg.parallel, amp_dtype)
    if not resume:
        check_objective_tokenizer(cfg)  # also before the run directory is touched
    init_ckpt = _init_checkpoint(cfg, resume)  # and this
    if main and (not resume or run_dir.is_dir()):  # rank 0 holds it; a --resume of nothing is refused below
        held.enter_context(DirectoryLock(run_dir))  # before anything in the run directory is read or deleted
    ckpt = world.broadcast(_prepare_run_dir(run_dir, resume, overwrite) if main else None)
    state = None
    if ckpt is not None:
        _check_same_model(ckpt_io.read_checkpoint_config(ckpt).model, cfg.model, ckpt)
        state = ckpt_io.load_train_state(ckpt)
        if state["step"] >= t.max_steps:  # before the trackers continue their runs, and before the data work
            raise UserError(f"{ckpt} is already at step {state['step']} >= train.max_steps={t.max_steps}: "
                            f"raise it (--set train.max_steps=N) to train further")
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        # Before the data work, so that a tracker that cannot start (no login, no network) fails fast.
        trackers.start(cfg, run_dir, state["step"] if state else 0)
    configure_device(device, t.deterministic)
    seed_everything(t.seed)  # the same initial weights on every rank

    weights_from = ckpt or init_ckpt  # its tokenizer is the model's
    data = _load_data(cfg, run_dir, Tokenizer.load(weights_from) if weights_from else None, show_progress, say,
                      world)
    tokenizer, batches, val_sets, fim_val_sets = data.tokenizer, data.sampler, data.val_sets, data.fim_val_sets
    if main:
        (run_dir / "config.toml").write_text(cfg.to_toml())

    model = MiniMind(cfg.model).to(device)
    if init_ckpt is not None:  # the full weights on every rank, before parallelize shards or splits them
        model.load_state_dict(ckpt_io.load_model_from_checkpoint(init_ckpt)[0].state_dict())
        say(f"initialized from {init_ckpt}: its weights, a fresh optimizer and schedule from step 0")
    step_model = parallelize(model, world, cfg.parallel, amp_dtype)
    if world.dp_rank:  # data-parallel replicas draw different dropout masks; tensor-parallel peers the same ones
        seed_everything(t.seed + world.dp_rank)
    layout = (f"; {world.size} processes, {cfg.parallel.mode if world.dp_size > 1 else 'no'} data parallel x "
              f"{world.dp_size}, tensor parallel x {world.tp_size}" if world.size > 1
              else "; FSDP2 offloading to the CPU in one process" if world.distributed else "")
    total, active = model.num_parameters(), model.num_active_parameters()
    size = f"{total / 1e6:.2f}M parameters" + (f" ({active / 1e6:.2f}M active per token)" if active < total else "")
    say(f"model: {size} on {device.type} "
        f"({precision.name}; {precision.reason}){layout}")
    optimizer = build_optimizer(model, cfg.optim, device.type)
    autocast, scaler = mixed_precision(device, amp_dtype)
    token_bytes = token_byte_lengths(tokenizer, cfg.model.vocab_size)

    step, tokens, elapsed_before = 0, 0, 0.0
    if state is not None:
        ckpt_io.load_weights_and_optimizer(ckpt, model, optimizer, world)
        load_scaler_state(scaler, state["scaler"])
        batches.load_state_dict(state["data"])
        step, tokens, elapsed_before = state["step"], state["tokens"], state["elapsed"]
        if not ckpt_io.restore_rng_of_rank(ckpt, world):
            # Only dropout draws from these; the data order is the sampler's and continues exactly.
            seed_everything(t.seed + 1_000_003 * step + world.dp_rank)
            say(f"the checkpoint was saved by another number of processes than this run's {world.size}: random "
                "number generators re-seeded (dropout masks differ from an uninterrupted run)")
        say(f"resumed from {ckpt} at step {step} ({tokens:,} tokens)")
    step_model = torch.compile(step_model) if t.compile else step_model
    metrics = MetricsLog(run_dir / "metrics.jsonl", resume_step=step, trackers=trackers) if main else None
    if main:
        _rewind_samples(run_dir / "samples.txt", step)

    def save():
        train_state = {
            "step": step, "tokens": tokens, "elapsed": elapsed(), "scaler": scaler.state_dict(),
            "data": batches.state_dict(),
        }
        saved = ckpt_io.save_checkpoint(run_dir, step, model, optimizer, cfg, tokenizer, train_state,
                                        t.keep_checkpoints, world)
        if main:
            write_run_plot(run_dir)  # never fails training: a plotting error is a warning
        return saved

    def evaluate_sets(sets: dict) -> dict:
        return {name: evaluate(model, rows, t.batch_size, token_bytes, t.eval_batches, str(device), autocast,
                               world=world) for name, rows in sets.items()}

    def validate() -> dict:  # every rank evaluates (FSDP and tensor-parallel forwards are collective); rank 0 reports
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
        generator = torch.Generator(device=device).manual_seed(t.seed)  # never touches the training RNG
        with autocast:
            text = complete(model, tokenizer, t.sample_prompt, t.sample_tokens, generator=generator, device=device)
        if main:
            with open(run_dir / "samples.txt", "a", encoding="utf-8") as f:
                f.write(f"--- step {step}\n{text}\n")
        say(f"step {step} sample: {text[:300]!r}")
        return text

    start = time.perf_counter()

    def elapsed():
        return elapsed_before + time.perf_counter() - start

    tokens_per_step = t.batch_size * t.seq_len * t.grad_accum * world.dp_size  # global
    first_val = validate() if val_sets and step == 0 else None
    last_val, losses = first_val, []
    first_step = step
    window_steps, window_time, session_time = 0, 0.0, 0.0  # time in training steps only, not eval or saving
    # Redirected to a file, the bar would write a line per step: refresh it every 30 s instead.
    bar = tqdm(total=t.max_steps, initial=step, desc="train", unit="step", disable=not show_progress,
               dynamic_ncols=True, mininterval=0.1 if sys.stderr.isatty() else 30)
    try:
        while step < t.max_steps:
            step_start = time.perf_counter()
            lr = lr_at(step, cfg.optim, t.max_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            micro_batches = [batches.next_batch(t.batch_size, world.dp_rank, world.dp_size)
                             for _ in range(t.grad_accum)]
            step_loss, aux_loss = accumulate_gradients(step_model, micro_batches, autocast, scaler, world, model.causal)
            if not math.isfinite(step_loss):
                raise UserError(f"loss is {step_loss} at step {step + 1}: training diverged; lower optim.lr or "
                                f"raise optim.warmup_steps, then resume from the last checkpoint with --resume")
            grad_norm = apply_gradients(model, optimizer, scaler, cfg.optim.grad_clip)
            balance = moe.end_of_step(model, world, cfg.model.router_bias_update_rate)  # None for dense models
            step += 1
            tokens += tokens_per_step
            losses.append(step_loss)
            step_time = time.perf_counter() - step_start
            window_steps += 1
            window_time += step_time
            session_time += step_time
            bar.update(1)

            if step % t.log_every == 0 or step == t.max_steps:
                tokens_per_s = window_steps * tokens_per_step / max(window_time, 1e-9)
                record = {"step": step, "loss": step_loss, "lr": lr, "grad_norm": grad_norm, "tokens": tokens,
                          "elapsed": round(elapsed(), 3), "tokens_per_s": round(tokens_per_s, 1)}
                if balance is not None:
                    record.update(aux_loss=aux_loss, expert_balance=round(balance, 4))
                if len(batches.names) > 1:
                    record["tokens_by_source"] = batches.tokens_by_source()
                if main:
                    metrics.write(record)
                bar.set_postfix_str(f"loss {step_loss:.4f} lr {lr:.2e} {tokens_per_s:,.0f} tok/s", refresh=False)
                window_steps, window_time = 0, 0.0
            if val_sets and t.eval_every and step % t.eval_every == 0 and step < t.max_steps:
                last_val = validate()
            if t.sample_every and step % t.sample_every == 0 and step < t.max_steps:
                sample()
            if t.save_every and step % t.save_every == 0 and step < t.max_steps:
                save()
    finally:
        bar.close()

    if val_sets:
        last_val = validate()
    final_ckpt = save()  # before sampling: a failure while sampling must not cost the final checkpoint
    sample_text = sample()
    total_time = elapsed()
    summary = {
        "steps": step, "tokens": tokens, "elapsed_s": round(total_time, 1),
        "tokens_per_s": round((step - first_step) * tokens_per_step / max(session_time, 1e-9), 1),
        "final_train_loss": float(np.mean(losses[-10:])) if losses else None,
        "first_val_loss": first_val["val_loss"] if first_val else None,
        "final_val_loss": last_val["val_loss"] if last_val else None,
        "final_val_bpb": last_val.get("val_bpb") if last_val else None,
        "checkpoint": str(final_ckpt), "sample": sample_text,
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
    log(f"done: {step} steps, {tokens:,} tokens in {total_time:.0f}s; train loss {summary['final_train_loss']:.4f}"
        f"{'; ' + val_text if val_text else ''}; checkpoint {final_ckpt}")
    return summary
