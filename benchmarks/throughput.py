"""Training-step throughput of a MiniMind preset: step time, tokens/s, peak memory and MFU.

    python benchmarks/throughput.py --config configs/minimind2-26m.toml --batch-size 4 --seq-len 512
    python benchmarks/throughput.py --config configs/minimind2-26m.toml --compare-optimizer --steps 6
    python benchmarks/throughput.py --config configs/minimind2-26m.toml --compare-dtype --steps 10
    python benchmarks/throughput.py --config configs/minimind2-26m.toml --compare-ac --batch-size 8 --steps 5

Each step is the training step of `minipretrain.train.loop.train` on random tokens: the real `MiniMind`, the real
`build_optimizer`, autocast unless float32, GradScaler for float16, clip_grad_norm_, optimizer.step and
zero_grad(set_to_none=True). No data loading, validation or checkpointing is timed.

FLOPs per token = 6*N + 12*L*H*Q*T  (nanoGPT's convention: N = model.num_active_parameters(), all parameters of
a dense model and those one token passes through in a mixture of experts, tied embedding counted once; L layers,
H attention heads, Q head dim, T sequence length; forward + backward).
MFU = tokens/s * FLOPs per token / peak FLOP/s of the hardware (--peak-tflops, or on CUDA a table of dense
tensor-core peaks: bf16/fp16 for mixed precision, TF32 for float32).

--compare-optimizer trains two identical copies of the model, one with fused and one with foreach AdamW, and
--compare-dtype two copies in float32 and in bfloat16 autocast, in alternating blocks of steps so that drift in a
shared, noisy machine hits both alike; each quotes both runs' medians. --compare-ac does the same for three copies
with train.activation_checkpointing none, selective and full; since one process has a single peak, each mode's peak
memory comes from a child run of this script with that mode alone (1 warm-up + 1 timed step): on CUDA the peak
bytes allocated by tensors, elsewhere the child's peak RSS and its rise over the RSS just before its first step.
"""

from __future__ import annotations

import argparse
import copy
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
from minipretrain.errors import UserError
from minipretrain.model import MiniMind
from minipretrain.parallel import World, apply_activation_checkpointing, resolve_device
from minipretrain.precision import configure_device, mixed_precision, native_cpu_bf16, resolve_precision
from minipretrain.train.loop import accumulate_gradients, apply_gradients, seed_everything
from minipretrain.train.metrics import FLOPS_FORMULA, flops_per_token, gpu_peak_tflops
from minipretrain.train.optim import build_optimizer
from minipretrain.train.schedule import lr_at


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True, help="a TOML preset, e.g. configs/minimind2-26m.toml")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override (repeatable)")
    p.add_argument("--batch-size", type=int, help="default: train.batch_size of the preset")
    p.add_argument("--seq-len", type=int, help="default: train.seq_len of the preset")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--steps", type=int, default=10, help="timed steps (per optimizer with --compare-optimizer)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (per optimizer)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", choices=DTYPE_NAMES)
    p.add_argument("--compile", action="store_true", help="torch.compile the model (compiled during warmup)")
    p.add_argument("--peak-tflops", type=float, help="hardware peak for MFU (default: GPU table; CPU: n/a)")
    compare = p.add_mutually_exclusive_group()
    compare.add_argument("--compare-optimizer", action="store_true", help="fused vs foreach AdamW, interleaved")
    compare.add_argument("--compare-dtype", action="store_true", help="float32 vs bfloat16 autocast, interleaved")
    compare.add_argument("--compare-ac", action="store_true",
                         help="activation checkpointing none vs selective vs full, interleaved; peak memory of each")
    p.add_argument("--block", type=int, default=2, help="steps per A/B block with --compare-*")
    p.add_argument("--json", type=Path, help="default: benchmarks/results/throughput-<preset>.json")
    return p.parse_args(argv)


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
    """The real optimizer; with impl, the same groups and hyper-parameters forced to fused or foreach AdamW."""
    opt = build_optimizer(model, cfg.optim, device_type)
    if impl is None:
        return opt, "fused" if opt.defaults.get("fused") else "foreach"
    groups = [{"params": g["params"], "weight_decay": g["weight_decay"]} for g in opt.param_groups]
    d = opt.defaults
    return torch.optim.AdamW(groups, lr=d["lr"], betas=d["betas"], eps=d["eps"], **{impl: True}), impl


class Trainer:
    """One model + optimizer + dtype; step() is loop.py's training step on random tokens, timed."""

    def __init__(self, model, optimizer, name, cfg, device, amp_dtype, batches, ac="none"):
        self.model, self.optimizer, self.name, self.cfg, self.device = model, optimizer, name, cfg, device
        self.ac = ac  # train.activation_checkpointing, applied to `model`
        self.batches, self.step_model = batches, torch.compile(model) if cfg.train.compile else model
        self.amp_dtype = amp_dtype
        self.autocast, self.scaler = mixed_precision(device, amp_dtype)
        self.n, self.times, self.optim_times = 0, [], []

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        elif self.device.type == "mps":
            torch.mps.synchronize()

    def step(self, timed=True):
        cfg, t = self.cfg, self.cfg.train
        self.sync()
        start = time.perf_counter()
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(self.n, cfg.optim, t.max_steps)
        micro_batches = [self.batches[(self.n * t.grad_accum + i) % len(self.batches)] for i in range(t.grad_accum)]
        world = World(device=self.device)
        step_loss, _ = accumulate_gradients(self.step_model, micro_batches, self.autocast, self.scaler, world)
        self.sync()
        optim_start = time.perf_counter()
        apply_gradients(self.model, self.optimizer, self.scaler, cfg.optim.grad_clip)
        moe.end_of_step(self.model, world, cfg.model.router_bias_update_rate)
        self.sync()
        end = time.perf_counter()
        self.n += 1
        if timed:
            self.times.append(end - start)
            self.optim_times.append(end - optim_start)
        return step_loss


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
    if args.steps < 1 or args.warmup < 0 or args.block < 1:
        sys.exit("--steps and --block must be >= 1, --warmup >= 0")
    overrides = [*args.set, f"train.grad_accum={args.grad_accum}", f"train.device={args.device}",
                 f"train.dtype={args.dtype}", f"train.compile={str(args.compile).lower()}"]
    overrides += [f"train.batch_size={args.batch_size}"] * bool(args.batch_size)
    overrides += [f"train.seq_len={args.seq_len}"] * bool(args.seq_len)
    try:
        cfg = load_config(args.config, overrides)
        device = resolve_device(cfg.train.device)
        dtype = resolve_precision(cfg.train.dtype, device).dtype
        bf16 = resolve_precision("bfloat16", device).dtype if args.compare_dtype else None
    except UserError as e:
        sys.exit(f"error: {e}")
    m, t, preset = cfg.model, cfg.train, Path(args.config).stem
    configure_device(device)  # as loop.py does: denormals flushed on CPU, TF32 on CUDA
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seed_everything(t.seed)
    gen = torch.Generator().manual_seed(t.seed)
    inputs = [torch.randint(0, m.vocab_size, (t.batch_size, t.seq_len), generator=gen) for _ in range(8)]
    batches = [Batch(x, x.clone()) for x in inputs]  # labels are a copy of the inputs, as in PackedRows

    base = MiniMind(m).to(device)
    ac = t.activation_checkpointing
    variants = ([("fused", dtype, ac), ("foreach", dtype, ac)] if args.compare_optimizer  # (AdamW forced, dtype,
                else [(None, torch.float32, ac), (None, bf16, ac)] if args.compare_dtype  # activation checkpointing)
                else [(None, dtype, mode) for mode in ACTIVATION_CHECKPOINTING] if args.compare_ac
                else [(None, dtype, ac)])
    compare = len(variants) > 1
    trainers = []
    for i, (impl, amp_dtype, ac_mode) in enumerate(variants):
        model = copy.deepcopy(base) if i else base  # identical copies
        apply_activation_checkpointing(model, ac_mode)
        optimizer, optimizer_name = make_optimizer(model, cfg, device.type, impl)
        trainers.append(Trainer(model, optimizer, optimizer_name, cfg, device, amp_dtype, batches, ac_mode))
    n_params = base.num_active_parameters()
    n_total = base.num_parameters()
    tokens_per_step = t.batch_size * t.seq_len * t.grad_accum
    token_flops = flops_per_token(m, n_params, t.seq_len)
    hardware = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_description()
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
    print(f"\nlast loss {loss:.3f}; CPU busy before start {'n/a' if busy is None else f'{100 * busy:.0f}%'}; "
          f"peak memory{shared}: {mem_text}; MFU peak: {runs[-1]['peak_source']}\n")
    print("| preset | device | dtype | AdamW | AC | params | tokens/step | median s (min-max) | tokens/s "
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


def run_interleaved(trainers: list[Trainer], warmup: int, steps: int, block: int) -> float:
    """Untimed warmup steps for each trainer, then `steps` timed steps each, in blocks of `block` taken in turn
    (so that drift on a shared machine hits every variant alike); returns the last step's loss."""
    for trainer in trainers:
        for _ in range(warmup):
            trainer.step(timed=False)
    loss = float("nan")
    while any(len(tr.times) < steps for tr in trainers):
        for trainer in trainers:
            for _ in range(min(block, steps - len(trainer.times))):
                loss = trainer.step()
    return loss


def write_result(path: Path, result: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
