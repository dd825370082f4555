"""Training-step throughput of MiniMind presets: step time, tokens/s, peak memory and MFU.

    python benchmarks/throughput.py --config configs/minimind2-26m.toml --batch-size 4 --seq-len 512
    python benchmarks/throughput.py --config configs/minimind2-26m.toml --compare-optimizer --steps 6
    python benchmarks/throughput.py --config configs/minimind2-26m.toml --compare-dtype --steps 10
    python benchmarks/throughput.py --config configs/minimind2-26m.toml --compare-ac --batch-size 8 --steps 5
    python benchmarks/throughput.py --presets --steps 30 --block 5 --warmup 3        # the GPU suite, on one GPU

Each step is the training step of `minipretrain.train.loop.train`, made of the same train/step.py functions on random
tokens: the real `MiniMind`, the real `build_optimizer`, autocast unless float32, GradScaler for float16, the spike
guard's check, clipping, the preset's optimizer step (fused AdamW, or Muon + AdamW) and zero_grad(set_to_none=True). The
batches wait on the device (the trainer's loader prefetches them in a thread), so no data loading, validation or
checkpointing is timed.

FLOPs per token = 6*N + 12*L*H*Q*T  (nanoGPT's convention: N = model.num_active_parameters(), all parameters of
a dense model and those one token passes through in a mixture of experts, tied embedding counted once; L layers,
H attention heads, Q head dim, T sequence length; forward + backward).
MFU = tokens/s * FLOPs per token / peak FLOP/s of the hardware (--peak-tflops, or on CUDA a table of dense
tensor-core peaks: bf16/fp16 for mixed precision, TF32 for float32).

--compare-optimizer trains three identical copies of the model, with fused AdamW, foreach AdamW and Muon (+ AdamW for
the embedding and norms), and --compare-dtype two copies in float32 and in bfloat16 autocast, in alternating blocks of
steps so that drift in a shared, noisy machine hits all alike; each quotes every run's median. --compare-ac does the
same for three copies with train.activation_checkpointing none, selective and full; since one process has a single
peak, each mode's peak memory comes from a child run of this script with that mode alone (1 warm-up + 1 timed step):
on CUDA the peak bytes allocated by tensors, elsewhere the child's peak RSS and its rise over the RSS just before its
first step.
These modes synchronise the device around each step, to time the optimizer step apart.

--presets (default: tiny, minimind2-26m, minimind2-104m, llama-124m) runs each preset, one after the other, at its
own batch and sequence length, in up to four variants interleaved in blocks of --block steps: eager or with every
block compiled (`compile_blocks`, as the trainer does), each without and with document masking (doc_ids of packed
documents of random lengths, --doc-len tokens on average: FlexAttention on CUDA, SDPA with a dense mask elsewhere).
The device is synchronised only at the ends of a block, as the trainer's loop is between two read-backs, and a
step's time is its block's mean. The warm-up steps (compilation included) are untimed and reported apart. A
variant's peak memory is the peak during its blocks (CUDA: bytes allocated; elsewhere: the process's peak RSS,
reset before each block) less what the other variants keep in the same process (weights, AdamW state, batches).
It prints a Markdown table (preset, variant, tokens/s, step ms, peak memory, MFU) and writes JSON.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import gc
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from minipretrain import moe
from minipretrain.config import ACTIVATION_CHECKPOINTING, DTYPE_NAMES, load_config
from minipretrain.data.batches import Batch
from minipretrain.data.objectives import IGNORE
from minipretrain.data.prefetch import target_count
from minipretrain.errors import UserError
from minipretrain.model import MiniMind
from minipretrain.parallel import World, apply_activation_checkpointing, compile_blocks, resolve_device
from minipretrain.precision import configure_device, mixed_precision, native_cpu_bf16, resolve_precision
from minipretrain.train.loop import seed_everything
from minipretrain.train.metrics import FLOPS_FORMULA, flops_per_token, gpu_peak_tflops
from minipretrain.train.optim import build_optimizer, set_learning_rate
from minipretrain.train.schedule import lr_at
from minipretrain.train.stability import CODE, SpikeGuard
from minipretrain.train.step import accumulate_gradients, finish_step, unscale_and_clip

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
GPU_SUITE = "tiny,minimind2-26m,minimind2-104m,llama-124m"
VARIANTS = {"eager": (False, False), "eager+mask": (False, True),  # name: (blocks compiled, document masking)
            "compiled": (True, False), "compiled+mask": (True, True)}


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--config", help="a TOML preset, e.g. configs/minimind2-26m.toml")
    what.add_argument("--presets", nargs="?", const=GPU_SUITE, metavar="NAME,...",
                      help=f"presets (configs/NAME.toml or paths) run one after the other in --variants "
                           f"(default: {GPU_SUITE})")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override (repeatable)")
    p.add_argument("--batch-size", type=int, help="default: train.batch_size of the preset")
    p.add_argument("--seq-len", type=int, help="default: train.seq_len of the preset")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--steps", type=int, default=10, help="timed steps (per variant when several are compared)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (per variant)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", choices=DTYPE_NAMES)
    p.add_argument("--compile", action="store_true", help="torch.compile the blocks (compiled during warmup)")
    p.add_argument("--peak-tflops", type=float, help="hardware peak for MFU (default: GPU table; CPU: n/a)")
    compare = p.add_mutually_exclusive_group()
    compare.add_argument("--compare-optimizer", action="store_true",
                         help="fused vs foreach AdamW vs Muon (+ AdamW), interleaved")
    compare.add_argument("--compare-dtype", action="store_true", help="float32 vs bfloat16 autocast, interleaved")
    compare.add_argument("--compare-ac", action="store_true",
                         help="activation checkpointing none vs selective vs full, interleaved; peak memory of each")
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help=f"with --presets: which of {', '.join(VARIANTS)} (default: all)")
    p.add_argument("--doc-len", type=int, default=256, help="with --presets: mean document length of +mask rows")
    p.add_argument("--block", type=int, default=2, help="steps per block when variants are interleaved")
    p.add_argument("--json", type=Path, help="default: benchmarks/results/throughput-<preset>.json "
                                             "(--presets: throughput-presets-<device>.json)")
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.block < 1 or args.doc_len < 1:
        p.error("--steps, --block and --doc-len must be >= 1, --warmup >= 0")
    if args.presets is not None:
        if args.compile or args.compare_optimizer or args.compare_dtype or args.compare_ac:
            p.error("--presets compares eager and compiled itself (--variants); --compile and --compare-* go with "
                    "--config")
        args.variants = args.variants.split(",")
        unknown = [v for v in args.variants if v not in VARIANTS]
        if unknown or not args.variants:
            p.error(f"--variants: unknown {', '.join(unknown) or 'empty list'} (choose from {', '.join(VARIANTS)})")
    return args


def peak_tflops(args, device, dtype) -> tuple[float | None, str]:
    if args.peak_tflops:
        return args.peak_tflops, "--peak-tflops"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        tflops = gpu_peak_tflops(name, dtype)
        if tflops is None:
            sys.exit(f"unknown GPU {name!r}: pass --peak-tflops (its dense peak for this dtype) to compute MFU")
        kind = "TF32" if dtype == torch.float32 else "bf16/fp16"
        return tflops, f"{name}, dense {kind} tensor cores, from the table"
    return None, "n/a (pass --peak-tflops for this CPU)"


def cpu_description() -> str:
    """The CPU model (as lscpu names it) and its bf16 support, which decides whether bf16 pays off on it."""
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []
    name = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), "unknown CPU")
    return f"{name}, native bf16: {native_cpu_bf16() or 'none (bf16 is emulated)'}"


def make_optimizer(model, cfg, device_type, impl):
    """The real optimizer (impl None); with impl "fused" or "foreach", the same groups and hyper-parameters forced to
    that AdamW kernel for every tensor, whatever optim.name says; with impl "muon", Muon + AdamW as optim.name=muon
    builds it."""
    if impl == "muon" or (impl is None and cfg.optim.name == "muon"):
        return build_optimizer(model, dataclasses.replace(cfg.optim, name="muon"), device_type), "muon"
    opt = build_optimizer(model, dataclasses.replace(cfg.optim, name="adamw"), device_type)
    if impl is None:
        return opt, "fused" if opt.defaults.get("fused") else "foreach"
    groups = [{"params": g["params"], "weight_decay": g["weight_decay"]} for g in opt.param_groups]
    d = opt.defaults
    return torch.optim.AdamW(groups, lr=d["lr"], betas=d["betas"], eps=d["eps"], **{impl: True}), impl


def load_setup(args, config) -> tuple:
    """The preset with this run's overrides, its device and its autocast dtype; a bad config exits with one line."""
    overrides = [*args.set, f"train.grad_accum={args.grad_accum}", f"train.device={args.device}",
                 f"train.dtype={args.dtype}"]
    overrides += [f"train.compile={str(args.compile).lower()}"] * (args.presets is None)
    overrides += [f"train.batch_size={args.batch_size}"] * bool(args.batch_size)
    overrides += [f"train.seq_len={args.seq_len}"] * bool(args.seq_len)
    try:
        cfg = load_config(config, overrides)
        device = resolve_device(cfg.train.device)
        return cfg, device, resolve_precision(cfg.train.dtype, device).dtype
    except UserError as e:
        sys.exit(f"error: {e}")


def random_batches(cfg, seed: int, count: int = 8) -> list[Batch]:
    """`count` batches of random tokens at the preset's batch size and sequence length; the labels are a copy of
    the inputs, as in PackedRows (the model shifts them)."""
    gen = torch.Generator().manual_seed(seed)
    inputs = [torch.randint(0, cfg.model.vocab_size, (cfg.train.batch_size, cfg.train.seq_len), generator=gen)
              for _ in range(count)]
    return [Batch(x, x.clone()) for x in inputs]


def with_documents(batch: Batch, mean_doc_len: int, gen: torch.Generator) -> Batch:
    """The same tokens as packed documents of random lengths, laid out as PackedRows does with data.document_mask:
    a document starts at each position with probability 1 / mean_doc_len, doc_ids count a row's documents from 0,
    and a document's first token is not predicted from the previous document's last."""
    starts = torch.rand(batch.inputs.shape, generator=gen) < 1 / mean_doc_len
    starts[:, 0] = False
    return Batch(batch.inputs, batch.labels.masked_fill(starts, IGNORE), starts.long().cumsum(dim=1))


def identical_copies(base, count: int) -> list:
    """`base` and count - 1 copies of it, made before any of them is changed (a compiled model is not copied)."""
    return [base] + [copy.deepcopy(base) for _ in range(count - 1)]


def prepare_model(model, ac: str, compile_blocks_too: bool):
    """What the trainer applies to a model before wrapping it, in its order: train.activation_checkpointing, then
    torch.compile block by block."""
    apply_activation_checkpointing(model, ac)
    if compile_blocks_too:
        compile_blocks(model)
    return model


class Trainer:
    """One model + optimizer + dtype + batches; a step is loop.py's training step (train/step.py's functions, the
    spike guard, the MoE bias update), without its data loading and logging."""

    def __init__(self, model, optimizer, name, cfg, device, amp_dtype, batches, ac="none"):
        self.model, self.optimizer, self.name, self.cfg, self.device = model, optimizer, name, cfg, device
        self.ac = ac  # train.activation_checkpointing, applied to `model`
        self.amp_dtype = amp_dtype
        self.autocast, self.scaler = mixed_precision(device, amp_dtype)
        self.world = World(device=device)
        self.guard = SpikeGuard(cfg.guard, cfg.optim.warmup_steps, device)
        # On the device ahead of time, with their predicted-token counts, as the trainer's loader hands them over.
        self.target_counts = [target_count(b, model.causal) for b in batches]
        self.batches = [b.to(device) for b in batches]
        self.n, self.timed_steps = 0, 0
        self.times, self.optim_times, self.warmup_times = [], [], []  # seconds per step
        self.loss = None  # the last step's loss (a device tensor)
        self.peak_bytes = 0  # the peak memory seen during this trainer's timed blocks (run_interleaved)

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        elif self.device.type == "mps":
            torch.mps.synchronize()

    def accumulate(self) -> torch.Tensor:
        """Forward and backward over the step's micro-batches at the scheduled learning rate: the step's loss."""
        cfg, t = self.cfg, self.cfg.train
        set_learning_rate(self.optimizer, lr_at(self.n, cfg.optim, t.max_steps), cfg.optim)
        picks = [(self.n * t.grad_accum + i) % len(self.batches) for i in range(t.grad_accum)]
        loss, _ = accumulate_gradients(self.model, [self.batches[i] for i in picks], self.autocast, self.scaler,
                                       self.world, self.model.causal, [self.target_counts[i] for i in picks])
        return loss

    def update(self, loss: torch.Tensor) -> None:
        """Clip, let the spike guard judge, step the optimizer (or skip, as the guard says), move the MoE biases."""
        grad_norm = unscale_and_clip(self.model, self.optimizer, self.scaler, self.cfg.optim.grad_clip, self.world)
        verdict = self.guard.check(self.n + 1, loss, grad_norm, check_grad_finite=not self.scaler.is_enabled())
        bad = verdict[CODE] > 0
        finish_step(self.optimizer, self.scaler, skip=bad)
        moe.end_of_step(self.model, self.world, self.cfg.model.router_bias_update_rate, applied=~bad)
        self.guard.update(verdict)
        self.n += 1

    def step(self, timed=True) -> torch.Tensor:
        """One step, the device synchronised before it, after it and between backward and the optimizer step,
        which times the two apart; untimed, it counts as warm-up."""
        self.sync()
        start = time.perf_counter()
        loss = self.accumulate()
        self.sync()
        optim_start = time.perf_counter()
        self.update(loss)
        self.sync()
        end = time.perf_counter()
        self.loss = loss
        if timed:
            self.times.append(end - start)
            self.optim_times.append(end - optim_start)
            self.timed_steps += 1
        else:
            self.warmup_times.append(end - start)
        return loss

    def run(self, steps: int) -> torch.Tensor:
        """`steps` timed steps with the device synchronised only before and after, as in the trainer's loop between
        two read-backs (the GPU works through one step while Python queues the next); records their mean."""
        self.sync()
        start = time.perf_counter()
        for _ in range(steps):
            loss = self.accumulate()
            self.update(loss)
        self.sync()
        self.times.append((time.perf_counter() - start) / steps)
        self.timed_steps += steps
        self.loss = loss
        return loss

    def resident_bytes(self) -> int:
        """What this trainer keeps on its device between steps: weights, buffers, optimizer state and its batches."""
        tensors = [*self.model.parameters(), *self.model.buffers()]
        tensors += [t for batch in self.batches for t in batch if t is not None]
        tensors += [v for state in self.optimizer.state.values() for v in state.values() if torch.is_tensor(v)]
        return sum(t.numel() * t.element_size() for t in tensors)


def peak_memory(device) -> dict:
    """Peak bytes: on CUDA what tensors held (allocated) and what the caching allocator took from the GPU
    (reserved, what nvidia-smi shows); elsewhere the process's peak RSS."""
    if device.type == "cuda":
        return {"allocated": torch.cuda.max_memory_allocated(device),
                "reserved": torch.cuda.max_memory_reserved(device)}
    # Linux: VmHWM, the peak of this program's own memory; ru_maxrss would report the parent's peak in a child
    # started by one that was bigger (Linux carries it across fork and exec).
    hwm = proc_status_bytes("VmHWM")
    if hwm is not None:
        return {"rss": hwm}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return {"rss": rss if sys.platform == "darwin" else rss * 1024}


def reset_peak_memory(device) -> bool:
    """Start a new peak: CUDA's allocator statistics, or on Linux the process's peak RSS (writing 5 to
    /proc/self/clear_refs sets VmHWM to the current RSS). False where the peak cannot be reset (then peak_memory
    keeps the process's peak so far)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return True
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def proc_status_bytes(field: str) -> int | None:
    """A memory field of /proc/self/status (VmRSS: resident now, VmHWM: peak resident) in bytes; None off Linux."""
    try:
        lines = Path("/proc/self/status").read_text().splitlines()
        return next(int(line.split()[1]) * 1024 for line in lines if line.startswith(field + ":"))
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def memory_of_each_mode(argv: list[str]) -> dict[str, dict]:
    """{mode: peak_memory_bytes} from a child run of this script per activation-checkpointing mode."""
    kept, args = [], iter(argv)
    for arg in args:  # this run's flags, less those the child sets itself
        if arg.partition("=")[0] in ("--json", "--steps", "--warmup", "--block") and "=" not in arg:
            next(args, None)  # and its value
        elif arg.partition("=")[0] not in ("--compare-ac", "--json", "--steps", "--warmup", "--block"):
            kept.append(arg)
    peaks = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in ACTIVATION_CHECKPOINTING:
            out = Path(tmp) / f"{mode}.json"
            cmd = [sys.executable, __file__, *kept, "--set", f"train.activation_checkpointing={mode}",
                   "--steps", "1", "--warmup", "1", "--json", str(out)]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode:
                sys.exit(f"the memory run for {mode} failed:\n{done.stderr[-2000:]}")
            peaks[mode] = json.loads(out.read_text())["peak_memory_bytes"]
    return peaks


def cpu_busy(seconds=1.0) -> float | None:
    """Share of all CPUs busy over `seconds` (Linux /proc/stat), to flag other work before timing starts."""
    def sample():
        values = [int(v) for v in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
        return values[3] + values[4], sum(values)  # idle + iowait, total
    try:
        (idle0, total0), _, (idle1, total1) = sample(), time.sleep(seconds), sample()
    except (OSError, ValueError, IndexError):
        return None
    return 1 - (idle1 - idle0) / max(total1 - total0, 1)


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.presets is not None:
        return run_presets(args)
    cfg, device, dtype = load_setup(args, args.config)
    bf16 = resolve_precision("bfloat16", device).dtype if args.compare_dtype else None
    m, t, preset = cfg.model, cfg.train, Path(args.config).stem
    configure_device(device)  # as loop.py does: denormals flushed on CPU, TF32 on CUDA
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seed_everything(t.seed)
    batches = random_batches(cfg, t.seed)

    base = MiniMind(m).to(device)
    ac = t.activation_checkpointing
    variants = ([(impl, dtype, ac) for impl in ("fused", "foreach", "muon")] if args.compare_optimizer  # (optimizer,
                else [(None, torch.float32, ac), (None, bf16, ac)] if args.compare_dtype  # dtype, act. checkpointing)
                else [(None, dtype, mode) for mode in ACTIVATION_CHECKPOINTING] if args.compare_ac
                else [(None, dtype, ac)])
    compare = len(variants) > 1
    n_params = base.num_active_parameters()
    n_total = base.num_parameters()
    trainers = []
    for model, (impl, amp_dtype, ac_mode) in zip(identical_copies(base, len(variants)), variants, strict=True):
        prepare_model(model, ac_mode, bool(t.compile))
        optimizer, optimizer_name = make_optimizer(model, cfg, device.type, impl)
        trainers.append(Trainer(model, optimizer, optimizer_name, cfg, device, amp_dtype, batches, ac_mode))
    tokens_per_step = t.batch_size * t.seq_len * t.grad_accum
    token_flops = flops_per_token(m, n_params, t.seq_len)
    hardware = hardware_name(device)
    size = f"{n_total / 1e6:.2f}M parameters" + (f" ({n_params / 1e6:.2f}M active)" if n_params < n_total else "")
    print(f"{preset}: {size} on {device} ({hardware}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads{', compiled' if t.compile else ''}); batch {t.batch_size} x seq "
          f"{t.seq_len} x accum {t.grad_accum} = {tokens_per_step:,} tokens/step")
    print(f"{FLOPS_FORMULA} = 6*{n_params:,} + 12*{m.num_hidden_layers}*{m.num_attention_heads}*{m.head_dim}*"
          f"{t.seq_len} = {token_flops / 1e6:.1f} MFLOP")

    rss_before_steps = proc_status_bytes("VmRSS") if device.type != "cuda" else None
    busy = warn_if_busy()
    block = args.block if compare else args.steps
    loss = run_interleaved(trainers, args.warmup, args.steps, block)
    mem = peak_memory(device)
    if rss_before_steps is not None:
        mem["rss_before_steps"] = rss_before_steps
    mode_memory = memory_of_each_mode(argv) if args.compare_ac else None

    runs = []
    for tr in trainers:
        tokens_per_s = tokens_per_step / statistics.median(tr.times)
        peak, peak_source = peak_tflops(args, device, tr.amp_dtype)
        runs.append({"optimizer": tr.name, "dtype": str(tr.amp_dtype).removeprefix("torch."),
                     "activation_checkpointing": tr.ac,
                     "median_s": statistics.median(tr.times), "min_s": min(tr.times),
                     "max_s": max(tr.times), "tokens_per_s": tokens_per_s,
                     "optimizer_median_ms": 1e3 * statistics.median(tr.optim_times),
                     "achieved_tflops": tokens_per_s * token_flops / 1e12, "peak_tflops": peak,
                     "peak_source": peak_source, "mfu": tokens_per_s * token_flops / (peak * 1e12) if peak else None,
                     "step_times_s": tr.times, "optimizer_times_s": tr.optim_times})
        if mode_memory:
            runs[-1]["peak_memory_bytes"] = mode_memory[tr.ac]
    shared = " (all models, one process)" if compare else ""
    mem_text = (f"allocated {mem['allocated'] / 2**20:,.0f} MiB, reserved {mem['reserved'] / 2**20:,.0f} MiB"
                if "allocated" in mem else f"process RSS {mem['rss'] / 2**20:,.0f} MiB")
    print(f"\nlast loss {float(loss):.3f}; CPU busy before start {'n/a' if busy is None else f'{100 * busy:.0f}%'}; "
          f"peak memory{shared}: {mem_text}; MFU peak: {runs[-1]['peak_source']}\n")
    print("| preset | device | dtype | optimizer | AC | params | tokens/step | median s (min-max) | tokens/s "
          "| optim step ms | TFLOP/s | MFU |\n" + "|---" * 12 + "|")
    for r in runs:
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        print(f"| {preset} | {device} | {r['dtype']} | {r['optimizer']} | {r['activation_checkpointing']} "
              f"| {size.replace(' parameters', '')} "
              f"| {tokens_per_step:,} "
              f"| {r['median_s']:.3f} ({r['min_s']:.3f}-{r['max_s']:.3f}) | {r['tokens_per_s']:,.0f} "
              f"| {r['optimizer_median_ms']:.1f} | {r['achieved_tflops']:.3f} | {mfu} |")
    if args.compare_dtype:
        print(f"\nbfloat16 / float32 tokens/s: {runs[1]['tokens_per_s'] / runs[0]['tokens_per_s']:.2f}x")
    if mode_memory:
        print_memory_table(runs, device)

    result = {"preset": preset, "config": args.config, "overrides": args.set, "device": str(device),
              "hardware": hardware, "compile": t.compile, "torch": torch.__version__,
              "threads": torch.get_num_threads(), "batch_size": t.batch_size, "seq_len": t.seq_len,
              "grad_accum": t.grad_accum, "steps": args.steps, "warmup": args.warmup,
              "interleaved_block": block if compare else None, "parameters": n_total, "active_parameters": n_params,
              "tokens_per_step": tokens_per_step, "flops_formula": FLOPS_FORMULA, "flops_per_token": token_flops,
              "peak_memory_bytes": mem, "cpu_busy_before": busy, "runs": runs}
    write_result(args.json or Path("benchmarks/results") / f"throughput-{preset}.json", result)
    return result


def run_presets(args) -> dict:
    """--presets: each preset in each of --variants, interleaved; a Markdown table for the README and JSON."""
    device = None
    presets, busy = [], warn_if_busy()
    for name in args.presets.split(","):
        path = Path(name) if name.endswith(".toml") else CONFIGS / f"{name}.toml"
        presets.append(bench_preset(args, path))
        device = torch.device(presets[-1]["device"])
        release_memory(device)
    first = presets[0]
    timing = (f"median of {args.steps} timed steps per variant after {args.warmup} warm-up "
              f"step{'s' * (args.warmup != 1)}, variants interleaved in blocks of {args.block}")
    mfu = (f"MFU = {FLOPS_FORMULA.removeprefix('FLOPs/token = ')} per token against {first['peak_tflops']:g} TFLOP/s "
           f"({first['peak_source']})" if first["peak_tflops"] else f"MFU {first['peak_source']}")
    today = datetime.date.today()
    header = f"{first['hardware']}, torch {torch.__version__}, {first['dtype']}, {today}: {timing}; {mfu}"
    print(f"\n{header}\n\n| preset | variant | tokens/s | step ms | peak memory | MFU |\n" + "| --- " * 6 + "|")
    for preset in presets:
        for v in preset["variants"]:
            share = f"{100 * v['mfu']:.1f}%" if v["mfu"] is not None else "n/a"
            print(f"| {preset['preset']} | {v['name']} | {v['tokens_per_s']:,.0f} | {1e3 * v['median_s']:,.1f} "
                  f"| {format_bytes(v['peak_memory_bytes'])} | {share} |")
    print()
    for preset in presets:
        first_steps = ", ".join(f"{v['name']} {v['warmup_s'][0]:.1f} s" for v in preset["variants"] if v["warmup_s"])
        costs = ", ".join(f"{mode} {100 * cost:.1f}%" for mode, cost in preset["document_mask_cost"].items())
        print(f"{preset['preset']}: batch {preset['batch_size']} x seq {preset['seq_len']}, "
              f"{preset['parameters'] / 1e6:.2f}M parameters"
              + (f"; first (untimed) step, compilation included: {first_steps}" if first_steps else "")
              + (f"; document masking: {costs} of the masked step" if costs else ""))
    result = {"header": header, "device": str(device), "hardware": first["hardware"], "torch": torch.__version__,
              "date": str(today), "threads": torch.get_num_threads(), "overrides": args.set,
              "steps": args.steps, "warmup": args.warmup, "interleaved_block": args.block, "doc_len": args.doc_len,
              "flops_formula": FLOPS_FORMULA, "cpu_busy_before": busy, "presets": presets}
    write_result(args.json or Path("benchmarks/results") / f"throughput-presets-{device.type}.json", result)
    return result


def bench_preset(args, path: Path) -> dict:
    """One preset's variants, interleaved in one process: their medians, peak memory, MFU and warm-up times."""
    cfg, device, dtype = load_setup(args, path)
    m, t = cfg.model, cfg.train
    peak, peak_source = peak_tflops(args, device, dtype)  # an unknown GPU stops here, before any work
    configure_device(device)
    seed_everything(t.seed)
    plain = random_batches(cfg, t.seed)
    gen = torch.Generator().manual_seed(t.seed + 1)
    masked = [with_documents(b, args.doc_len, gen) for b in plain]
    base = MiniMind(m).to(device)
    n_total, n_params = base.num_parameters(), base.num_active_parameters()
    trainers = []
    for name, model in zip(args.variants, identical_copies(base, len(args.variants)), strict=True):
        compiled, document_mask = VARIANTS[name]
        prepare_model(model, t.activation_checkpointing, compiled)
        optimizer, optimizer_name = make_optimizer(model, cfg, device.type, None)
        trainers.append(Trainer(model, optimizer, name, cfg, device, dtype, masked if document_mask else plain))
    print(f"{path.stem}: {n_params / 1e6:.2f}M parameters on {device} ({hardware_name(device)}), "
          f"{str(dtype).removeprefix('torch.')}, {optimizer_name}, batch {t.batch_size} x seq {t.seq_len} x accum "
          f"{t.grad_accum}; "
          f"{', '.join(args.variants)}", flush=True)
    peaks_reset = reset_peak_memory(device)  # whether each block's peak is its own (else the process's so far)
    run_interleaved(trainers, args.warmup, args.steps, args.block, per_step=False, track_peaks=True)

    tokens_per_step = t.batch_size * t.seq_len * t.grad_accum
    token_flops = flops_per_token(m, n_params, t.seq_len)
    resident = [tr.resident_bytes() for tr in trainers]
    variants = []
    for tr, own in zip(trainers, resident, strict=True):
        median = statistics.median(tr.times)
        tokens_per_s = tokens_per_step / median
        compiled, document_mask = VARIANTS[tr.name]
        variants.append({"name": tr.name, "compiled": compiled, "document_mask": document_mask,
                         "median_s": median, "tokens_per_s": tokens_per_s,
                         "mfu": tokens_per_s * token_flops / (peak * 1e12) if peak else None,
                         "peak_memory_bytes": tr.peak_bytes - (sum(resident) - own),
                         "warmup_s": tr.warmup_times, "block_mean_step_s": tr.times})
    median_of = {v["name"]: v["median_s"] for v in variants}
    mask_cost = {mode: 1 - median_of[mode] / median_of[f"{mode}+mask"]
                 for mode in ("eager", "compiled") if {mode, f"{mode}+mask"} <= median_of.keys()}
    return {"preset": path.stem, "config": str(path), "device": str(device), "hardware": hardware_name(device),
            "dtype": str(dtype).removeprefix("torch."), "optimizer": optimizer_name, "parameters": n_total,
            "active_parameters": n_params, "batch_size": t.batch_size, "seq_len": t.seq_len, "grad_accum": t.grad_accum,
            "tokens_per_step": tokens_per_step, "flops_per_token": token_flops, "peak_tflops": peak,
            "peak_source": peak_source, "peak_memory": "cuda max_memory_allocated" if device.type == "cuda" else
            f"peak RSS of the process{' (reset per block)' if peaks_reset else ' (whole run)'}",
            "document_mask_cost": mask_cost, "variants": variants}


def release_memory(device) -> None:
    """Between presets: free the last one's models and compiled code (a new preset starts with fresh graphs, not
    dynamic-shape ones recompiled from the previous preset's)."""
    gc.collect()
    torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def hardware_name(device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_description()


def format_bytes(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:,.0f} MiB"


def print_memory_table(runs: list[dict], device) -> None:
    """Step time and peak memory of each activation-checkpointing mode, relative to none."""
    kind = "allocated" if device.type == "cuda" else "RSS"
    print(f"\n| activation checkpointing | median step s | step vs none | peak {kind} MiB | rise over start MiB "
          "| rise vs none |\n" + "|---" * 6 + "|")
    base = runs[0]
    for r in runs:
        mem = r["peak_memory_bytes"]
        peak = mem.get("allocated", mem.get("rss"))
        rise = peak - mem.get("rss_before_steps", 0)  # CUDA: allocated starts near the weights alone
        base_mem = base["peak_memory_bytes"]
        base_rise = base_mem.get("allocated", base_mem.get("rss")) - base_mem.get("rss_before_steps", 0)
        print(f"| {r['activation_checkpointing']} | {r['median_s']:.3f} | {r['median_s'] / base['median_s']:.2f}x "
              f"| {peak / 2**20:,.0f} | {rise / 2**20:,.0f} | {rise / base_rise:.2f}x |")


def warn_if_busy() -> float | None:
    busy = cpu_busy()
    if busy is not None and busy > 0.2:
        print(f"warning: the CPUs were {100 * busy:.0f}% busy just before timing: other work will skew the numbers")
    return busy


def run_interleaved(trainers: list[Trainer], warmup: int, steps: int, block: int, per_step: bool = True,
                    track_peaks: bool = False) -> torch.Tensor:
    """Untimed warmup steps for each trainer, then `steps` timed steps each, in blocks of `block` taken in turn
    (so that drift on a shared machine hits every variant alike). per_step: each step synchronised and timed on
    its own (Trainer.step); else each block as the trainer's loop runs it (Trainer.run). track_peaks: each trainer's
    peak_bytes is the highest peak memory of its blocks. Returns the last step's loss."""
    for trainer in trainers:
        for _ in range(warmup):
            trainer.step(timed=False)
    loss = None
    while any(tr.timed_steps < steps for tr in trainers):
        for trainer in trainers:
            n = min(block, steps - trainer.timed_steps)
            if n == 0:
                continue
            if track_peaks:
                reset_peak_memory(trainer.device)
            if per_step:
                for _ in range(n):
                    trainer.step()
            else:
                trainer.run(n)
            loss = trainer.loss
            if track_peaks:
                peak = peak_memory(trainer.device)
                trainer.peak_bytes = max(trainer.peak_bytes, peak.get("allocated", peak.get("rss", 0)))
    return loss


def write_result(path: Path, result: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
