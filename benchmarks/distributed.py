"""Data parallelism on CPU (gloo): DDP scaling from 1 to 2 processes, and memory per rank of DDP against FSDP2.

    python benchmarks/distributed.py                                  # minimind2-26m, batch 4 x seq 256 per rank
    python benchmarks/distributed.py --config configs/tiny.toml --steps 4 --repeats 1

1. Scaling: the training step of `minipretrain.train.loop` (the real MiniMind, build_optimizer, parallelize,
   accumulate_gradients, apply_gradients) on random tokens, the same per-rank batch in every run:
     single-2t  1 process, 2 threads        ddp        2 processes under torchrun, 1 thread each
     single-1t  1 process, 1 thread         fsdp       2 processes, FSDP2, 1 thread each
   Threads = cores / processes, so single-2t and ddp both use the whole machine (equal total threads):
     efficiency        = ddp tokens/s per process / single-2t tokens/s   (the definition asked for; 1.0 = linear)
     equal total thr.  = ddp tokens/s total / single-2t tokens/s         (= 2 x efficiency: what 2 ranks buy)
     equal thr./proc.  = ddp tokens/s per process / single-1t tokens/s   (the cost of gradient all-reduce alone)
   Runs are interleaved --repeats times so drift on a shared machine hits all alike; step time is the median over
   all timed steps of all repeats (for 2 ranks, the slower rank's time of each step).
2. Memory per rank, DDP against FSDP2: the bytes of model state held by each rank (parameters + gradients +
   optimizer state, summed over local tensors: `.to_local()` of FSDP's DTensors), counted after backward of one
   extra step, before optimizer.step; and peak RSS (getrusage ru_maxrss; VmHWM as a cross-check, as ru_maxrss
   can carry the high-water mark of the launching process across exec). DDP's gradient buckets (another copy of
   the gradients) are not model state and show only in RSS. FSDP2 should hold about 1/N of the model state.
3. --pipeline: the bubble of each pipeline schedule (gpipe, 1f1b, interleaved_1f1b) on 2 stages, for a few
   micro-batch counts m, against the theory (p - 1) / (v*m + p - 1) (p stages, v stages per rank). Each run is
   2 processes with 1 thread each; rank 0 first times one process doing the same work alone (forward and backward
   of the whole model over the m micro-batches, 1 thread: T1), then both time the pipeline's forward_backward
   (T_pp, the slower rank's). measured bubble = 1 - (T1 / p) / T_pp: the share of the pipeline's time in which
   a rank does not do its part of the work (idle in the bubble, waiting on a send, or computing more than 1/p,
   as the last stage does with the head).

    python benchmarks/distributed.py --pipeline --config configs/tiny.toml --set model.num_hidden_layers=8
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUNS = {"single-2t": (1, "ddp"), "single-1t": (1, "ddp"), "ddp": (2, "ddp"), "fsdp": (2, "fsdp")}  # procs, mode


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="configs/minimind2-26m.toml", help="a TOML preset")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override (repeatable)")
    p.add_argument("--batch-size", type=int, default=4, help="per rank")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--steps", type=int, default=8, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--repeats", type=int, default=2, help="interleaved rounds of all runs")
    p.add_argument("--cores", type=int, default=os.cpu_count(), help="threads to share among a run's processes")
    p.add_argument("--pipeline", action="store_true", help="measure the pipeline bubble of each schedule instead")
    p.add_argument("--microbatches", default="2,4,8", help="--pipeline: the micro-batch counts m to measure")
    p.add_argument("--json", type=Path, help="default: benchmarks/results/distributed-<preset>.json")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # internal: one process of a run
    p.add_argument("--mode", default="ddp", help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--schedule", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def local_bytes(tensors) -> int:
    """Bytes of this rank's part of each tensor (a DTensor's local shard)."""
    return sum((t.to_local() if hasattr(t, "to_local") else t).nbytes for t in tensors if t is not None)


def worker(args) -> None:
    """One process of a run: train --warmup + --steps steps, then write this rank's timings and memory to --out."""
    import torch

    from minipretrain.config import load_config
    from minipretrain.data.batches import Batch
    from minipretrain.model import MiniMind
    from minipretrain.parallel import init_distributed, parallelize
    from minipretrain.precision import mixed_precision
    from minipretrain.train.loop import seed_everything
    from minipretrain.train.optim import build_optimizer
    from minipretrain.train.step import accumulate_gradients, apply_gradients

    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # as loop.py does
    cfg = load_config(args.config, [*args.set, f"train.batch_size={args.batch_size}", f"train.seq_len={args.seq_len}",
                                    "train.device=cpu", "train.dtype=float32", f"parallel.mode={args.mode}"])
    world = init_distributed(cfg.parallel, "cpu")
    seed_everything(cfg.train.seed)  # the same initial weights on every rank (FSDP shards them as they are)
    model = MiniMind(cfg.model)
    model, step_model = parallelize(model, world, cfg.parallel, torch.float32)
    optimizer = build_optimizer(model, cfg.optim, "cpu")
    autocast, scaler = mixed_precision(torch.device("cpu"), torch.float32)
    gen = torch.Generator().manual_seed(cfg.train.seed + world.dp_rank)  # each data-parallel rank its own data
    inputs = [torch.randint(0, cfg.model.vocab_size, (args.batch_size, args.seq_len), generator=gen) for _ in range(4)]
    batches = [Batch(x, x.clone()) for x in inputs]

    times = []
    for i in range(args.warmup + args.steps):
        world.barrier()  # every rank starts the step together: its time is then the step's, not a wait for a peer
        start = time.perf_counter()
        loss, _ = accumulate_gradients(step_model, [batches[i % len(batches)]], autocast, scaler, world)
        apply_gradients(model, optimizer, scaler, cfg.optim.grad_clip)
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    # One more step, counted between backward and optimizer.step: gradients exist (zero_grad sets them to None)
    # and the optimizer state does too (from the steps before).
    accumulate_gradients(step_model, [batches[0]], autocast, scaler, world)
    params = list(model.parameters())  # the tied embedding / head once
    state = {"params": local_bytes(params), "grads": local_bytes(p.grad for p in params),
             "optimizer": local_bytes(v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v))}
    apply_gradients(model, optimizer, scaler, cfg.optim.grad_clip)
    hwm = [line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmHWM")]
    result = {"rank": world.rank, "processes": world.size, "threads": torch.get_num_threads(), "times_s": times,
              "last_loss": float(loss), "parameters": model.num_parameters(), "model_state_bytes": state,
              "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # KiB on Linux
              "vm_hwm_mib": int(hwm[0].split()[1]) / 1024 if hwm else None, "torch": torch.__version__}
    (args.out / f"rank{world.rank}.json").write_text(json.dumps(result))
    world.close()


def pipeline_worker(args) -> None:
    """One rank of a --pipeline run: T1 (rank 0 alone, the whole model), then the pipeline's step time."""
    import torch

    from minipretrain.config import load_config, pipeline_shape
    from minipretrain.data.batches import Batch
    from minipretrain.model import MiniMind
    from minipretrain.parallel import init_distributed, parallelize
    from minipretrain.precision import mixed_precision
    from minipretrain.train.loop import seed_everything
    from minipretrain.train.step import accumulate_gradients

    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    m = int(args.microbatches)  # one count per worker run
    cfg = load_config(args.config, [*args.set, f"train.batch_size={args.batch_size}", f"train.seq_len={args.seq_len}",
                                    f"train.grad_accum={m}", "train.device=cpu", "train.dtype=float32",
                                    "parallel.pipeline_parallel=2", f"parallel.pp_schedule={args.schedule}"])
    world = init_distributed(cfg.parallel, "cpu")
    seed_everything(cfg.train.seed)
    model = MiniMind(cfg.model)
    gen = torch.Generator().manual_seed(cfg.train.seed)
    inputs = [torch.randint(0, cfg.model.vocab_size, (args.batch_size, args.seq_len), generator=gen) for _ in range(m)]
    batches = [Batch(x, x.clone()) for x in inputs]
    autocast, scaler = mixed_precision(torch.device("cpu"), torch.float32)

    def timed(step) -> list[float]:
        times = []
        for i in range(args.warmup + args.steps):
            world.barrier()
            start = time.perf_counter()
            step()
            world.barrier()  # the step ends when its slowest rank does
            if i >= args.warmup:
                times.append(time.perf_counter() - start)
            model.zero_grad(set_to_none=True)
        return times

    alone = []
    if world.rank == 0:  # the same work in one process, one thread, while the other rank waits
        for i in range(args.warmup + args.steps):
            start = time.perf_counter()
            accumulate_gradients(model, batches, autocast, scaler)
            if i >= args.warmup:
                alone.append(time.perf_counter() - start)
            model.zero_grad(set_to_none=True)
    world.barrier()
    _, pipeline = parallelize(model, world, cfg.parallel, torch.float32, m)
    pipe_times = timed(lambda: accumulate_gradients(pipeline, batches, autocast, scaler, world))
    result = {"rank": world.rank, "alone_s": alone, "pipeline_s": pipe_times,
              "per_rank": pipeline_shape(cfg.parallel, m)[0], "torch": torch.__version__}
    (args.out / f"rank{world.rank}.json").write_text(json.dumps(result))
    world.close()


def pipeline_main(args) -> dict:
    """--pipeline: every schedule x micro-batch count, one 2-process run each; a table and JSON."""
    from minipretrain.config import PP_SCHEDULES
    from minipretrain.plan import pipeline_bubble

    preset = Path(args.config).stem
    counts = [int(m) for m in args.microbatches.split(",")]
    print(f"{preset} on 2 pipeline stages: {args.batch_size} rows x seq {args.seq_len} per micro-batch, "
          f"{args.steps} steps after {args.warmup} warm-up, 1 thread per process, load average before "
          f"{os.getloadavg()[0]:.2f}\n")
    print("| schedule | m | T1 alone s | pipeline step s | measured bubble | theory (p-1)/(v*m+p-1) |\n"
          + "|---" * 6 + "|")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for schedule in PP_SCHEDULES:  # from minipretrain.config
            for m in counts:
                out = Path(tmp) / f"{schedule}-{m}"
                out.mkdir()
                script = [__file__, "--worker", "--pipeline", "--schedule", schedule, "--microbatches", str(m),
                          "--config", args.config, "--batch-size", str(args.batch_size), "--seq-len",
                          str(args.seq_len), "--steps", str(args.steps), "--warmup", str(args.warmup),
                          "--out", str(out), *(f"--set={s}" for s in args.set)]
                cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *script]
                proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
                if proc.returncode:
                    sys.exit(f"{schedule} m={m} failed ({' '.join(cmd)}):\n{proc.stderr[-4000:]}")
                ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
                alone, step = statistics.median(ranks[0]["alone_s"]), statistics.median(ranks[0]["pipeline_s"])
                per_rank = ranks[0]["per_rank"]
                row = {"schedule": schedule, "microbatches": m, "stages_per_rank": per_rank, "alone_s": alone,
                       "pipeline_step_s": step, "measured_bubble": 1 - (alone / 2) / step,
                       "theoretical_bubble": pipeline_bubble(2, m, per_rank)}
                rows.append(row)
                print(f"| {schedule} | {m} | {alone:.3f} | {step:.3f} | {row['measured_bubble']:.3f} | "
                      f"{row['theoretical_bubble']:.3f} |", flush=True)
    result = {"preset": preset, "config": args.config, "overrides": args.set, "device": "cpu", "backend": "gloo",
              "batch_size_per_microbatch": args.batch_size, "seq_len": args.seq_len, "steps": args.steps,
              "warmup": args.warmup, "torch": ranks[0]["torch"], "rows": rows}
    out = args.json or ROOT / "benchmarks" / "results" / f"pipeline-{preset}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {out}")
    return result


def launch(args, name: str, out: Path) -> list[dict]:
    """One run in fresh processes; returns each rank's result."""
    procs, mode = RUNS[name]
    threads = max(args.cores // procs, 1) if name != "single-1t" else 1
    script = [__file__, "--worker", "--config", args.config, "--batch-size", str(args.batch_size), "--seq-len",
              str(args.seq_len), "--steps", str(args.steps), "--warmup", str(args.warmup), "--mode", mode,
              "--threads", str(threads), "--out", str(out), *(f"--set={s}" for s in args.set)]
    torchrun = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}"] if procs > 1 else []
    cmd = [sys.executable, *torchrun, *script]
    proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": str(threads)}, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"{name} failed ({' '.join(cmd)}):\n{proc.stderr[-4000:]}")
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(procs)]


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.worker:
        return pipeline_worker(args) if args.pipeline else worker(args)
    if args.pipeline:
        return pipeline_main(args)
    if args.steps < 1 or args.warmup < 0 or args.repeats < 1:
        sys.exit("--steps and --repeats must be >= 1, --warmup >= 0")
    preset, tokens = Path(args.config).stem, args.batch_size * args.seq_len  # tokens per rank per step
    print(f"{preset}: batch {args.batch_size} x seq {args.seq_len} = {tokens:,} tokens per rank per step, "
          f"{args.steps} steps after {args.warmup} warmup, {args.repeats} interleaved repeats, {args.cores} cores, "
          f"load average before {os.getloadavg()[0]:.2f}")
    ranks = {name: [] for name in RUNS}  # name -> one list of rank results per repeat
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for name in RUNS:
                out = Path(tmp) / f"{name}-{repeat}"
                out.mkdir()
                ranks[name].append(launch(args, name, out))
                step = statistics.median(max(ts) for ts in zip(*(r["times_s"] for r in ranks[name][-1]), strict=True))
                print(f"  repeat {repeat + 1}/{args.repeats} {name}: median step {step:.3f} s", flush=True)

    runs = {}
    for name, repeats in ranks.items():
        # per step, the slowest rank (a step ends for all when its last all-reduce does), pooled over repeats
        steps = [max(ts) for rank_results in repeats for ts in zip(*(r["times_s"] for r in rank_results), strict=True)]
        procs, median = len(repeats[0]), statistics.median(steps)
        runs[name] = {"processes": procs, "threads_per_process": repeats[0][0]["threads"], "median_step_s": median,
                      "repeat_medians_s": [statistics.median(max(ts) for ts in
                                                             zip(*(r["times_s"] for r in rr), strict=True))
                                           for rr in repeats],
                      "tokens_per_s_total": procs * tokens / median, "tokens_per_s_per_process": tokens / median,
                      "ranks": repeats[-1]}  # memory is the same in every repeat: keep the last one's ranks
    per_proc = lambda name: runs[name]["tokens_per_s_per_process"]  # noqa: E731
    ratios = {"efficiency": per_proc("ddp") / per_proc("single-2t"),
              "equal_total_threads": runs["ddp"]["tokens_per_s_total"] / per_proc("single-2t"),
              "equal_threads_per_process": per_proc("ddp") / per_proc("single-1t")}

    print("\n| run | processes | threads/process | median step s (per repeat) | tokens/s total | tokens/s per process |"
          "\n" + "|---" * 6 + "|")
    for name, r in runs.items():
        reps = ", ".join(f"{s:.3f}" for s in r["repeat_medians_s"])
        print(f"| {name} | {r['processes']} | {r['threads_per_process']} | {r['median_step_s']:.3f} ({reps}) "
              f"| {r['tokens_per_s_total']:,.0f} | {r['tokens_per_s_per_process']:,.0f} |")
    noisy = [n for n, r in runs.items() if max(r["repeat_medians_s"]) > 1.25 * min(r["repeat_medians_s"])]
    if noisy:
        print(f"warning: repeats of {', '.join(noisy)} differ by over 25%: other work on the machine skews them")
    print(f"\nDDP scaling efficiency (per process, 2 x 1 thread vs 1 x 2 threads): {ratios['efficiency']:.2f}; "
          f"equal total threads (2 vs 1 process, whole machine): {ratios['equal_total_threads']:.2f}x; "
          f"equal threads per process (1 thread each): {ratios['equal_threads_per_process']:.2f}")

    MiB = 2**20
    print("\n| mode | rank | params MiB | grads MiB | optimizer MiB | model state MiB | peak RSS MiB | VmHWM MiB |\n"
          + "|---" * 8 + "|")
    for name in ("ddp", "fsdp"):
        for r in runs[name]["ranks"]:
            s = r["model_state_bytes"]
            s["total"] = s["params"] + s["grads"] + s["optimizer"]
            print(f"| {name} | {r['rank']} | {s['params'] / MiB:.2f} | {s['grads'] / MiB:.2f} "
                  f"| {s['optimizer'] / MiB:.2f} | {s['total'] / MiB:.2f} | {r['peak_rss_mib']:.0f} "
                  f"| {r['vm_hwm_mib']:.0f} |")
    state = {name: max(r["model_state_bytes"]["total"] for r in runs[name]["ranks"]) for name in ("ddp", "fsdp")}
    ratios["fsdp_over_ddp_model_state"] = state["fsdp"] / state["ddp"]
    print(f"\nFSDP2 / DDP model state per rank: {ratios['fsdp_over_ddp_model_state']:.3f} (ideal 1/2 = 0.500)")

    first = runs["ddp"]["ranks"][0]
    result = {"preset": preset, "config": args.config, "overrides": args.set, "device": "cpu", "backend": "gloo",
              "dtype": "float32", "torch": first["torch"], "cores": args.cores, "parameters": first["parameters"],
              "batch_size_per_rank": args.batch_size, "seq_len": args.seq_len, "tokens_per_rank_per_step": tokens,
              "steps": args.steps, "warmup": args.warmup, "repeats": args.repeats,
              "threads": {name: r["threads_per_process"] for name, r in runs.items()}, "ratios": ratios,
              "model_state_kind": "local params + grads + optimizer state (DTensor.to_local), after backward",
              "peak_rss_kind": "getrusage(RUSAGE_SELF).ru_maxrss per rank; vm_hwm_mib from /proc/self/status",
              "runs": runs}
    out = args.json or ROOT / "benchmarks" / "results" / f"distributed-{preset}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {out}")
    return result


if __name__ == "__main__":
    main()
