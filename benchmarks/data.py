"""Data pipeline benchmarks: preparation speed and memory, loader overhead, packed versus padded rows.

    python benchmarks/data.py                                  # all three on ../shared/data/sample_pretrain.jsonl
    python benchmarks/data.py --only prepare --workers 1 2

1. prepare: `minipretrain data prepare` speed in input MB/s, per worker, for each --workers value; then peak memory
   (the main process and its largest worker, from getrusage) preparing the corpus and the corpus repeated 10 times,
   each in a fresh process: memory must not grow with the corpus.
2. loader: the training step of the 26m preset (the real model, optimizer and step functions) fed by the real
   sampler over memory-mapped shards; the time to build each batch against the time of the step, per layout.
3. packing: positions that hold data (not padding) in packed and padded rows over the whole corpus, and useful
   tokens per second measured on the same steps as (2).

Timings are medians over steps interleaved between the layouts, so drift on a shared machine hits all alike.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from minipretrain.config import load_config
from minipretrain.data.batches import MixtureSampler, make_rows
from minipretrain.data.shards import PreparedData, PrepareOptions, prepare
from minipretrain.data.sources import iter_documents
from minipretrain.model import MiniMind
from minipretrain.precision import mixed_precision
from minipretrain.tokenizer import Tokenizer, train_tokenizer
from minipretrain.train.loop import seed_everything
from minipretrain.train.optim import build_optimizer
from minipretrain.train.step import accumulate_gradients, apply_gradients

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "sample_pretrain.jsonl"
RESULTS = ROOT / "benchmarks" / "results"

# Peak RSS of the main process from VmHWM (getrusage's ru_maxrss would include the benchmark process that
# started it, inherited across exec); workers from RUSAGE_CHILDREN (an upper bound for the same reason).
PROBE = """
import json, resource, sys, time
from pathlib import Path
from minipretrain.data.shards import PrepareOptions, prepare
from minipretrain.tokenizer import Tokenizer
start = time.perf_counter()
prepare([sys.argv[1]], Tokenizer.load(sys.argv[2]), sys.argv[3], PrepareOptions(workers=int(sys.argv[4])),
        show_progress=False, log=lambda m: None)
seconds = time.perf_counter() - start
hwm = [l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("VmHWM")][0]
print(json.dumps({"main_mib": int(hwm.split()[1]) / 1024, "seconds": seconds,
                  "worker_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))
"""


def get_tokenizer(args, scratch: Path) -> Tokenizer:
    if args.tokenizer:
        return Tokenizer.load(args.tokenizer)
    cached = RESULTS / "tokenizer-6400"
    if (cached / "tokenizer.json").is_file():
        return Tokenizer.load(cached)
    print(f"training a 6400-token tokenizer on {args.data} (cached in {cached})")
    tokenizer = train_tokenizer(iter_documents(str(args.data)), 6400, show_progress=False)
    tokenizer.save(cached)
    return tokenizer


def run_probe(path: Path, tok_dir: Path, out: Path, workers: int) -> dict:
    """`prepare` in a fresh process, as the CLI runs it (spawned workers then import nothing but the data code)."""
    shutil.rmtree(out, ignore_errors=True)
    stdout = subprocess.run([sys.executable, "-c", PROBE, str(path), str(tok_dir), str(out), str(workers)],
                            check=True, capture_output=True, text=True).stdout
    result = json.loads(stdout.strip().splitlines()[-1])
    result["input_mb"] = path.stat().st_size / 1e6
    result["mb_per_s"] = result["input_mb"] / result["seconds"]
    return result


def bench_prepare(args, tokenizer: Tokenizer, scratch: Path) -> dict:
    tok_dir = scratch / "tokenizer"
    tokenizer.save(tok_dir)
    runs = {w: [] for w in args.workers}
    for _ in range(args.repeats):  # interleave worker counts
        for workers in args.workers:
            runs[workers].append(run_probe(args.data, tok_dir, scratch / "prep", workers))
    manifest = PreparedData(scratch / "prep", verify=False).manifest
    print(f"\nprepare {args.data.name} ({runs[args.workers[0]][0]['input_mb']:.1f} MB, "
          f"{manifest['summary']['tokens']:,} tokens, {manifest['summary']['bytes_per_token']:.2f} bytes/token), "
          f"median of {args.repeats}, worker start-up included:")
    print("| workers | MB/s | MB/s per worker | tokens/s |")
    print("| --- | --- | --- | --- |")
    rows = []
    for workers, results in runs.items():
        mbps = statistics.median(r["mb_per_s"] for r in results)
        tps = manifest["summary"]["tokens"] / statistics.median(r["seconds"] for r in results)
        rows.append({"workers": workers, "mb_per_s": mbps, "mb_per_s_per_worker": mbps / workers,
                     "tokens_per_s": tps, "runs": results})
        workers_label = f"{workers}{' (in-process)' if workers == 1 else ''}"
        print(f"| {workers_label} | {mbps:.2f} | {mbps / workers:.2f} | {tps:,.0f} |")

    big = scratch / "corpus_x10.jsonl"
    with open(big, "wb") as f:
        for _ in range(10):
            f.write(args.data.read_bytes())
    workers = max(args.workers)
    memory = {"x1": runs[workers][0], "x10": run_probe(big, tok_dir, scratch / "prep-x10", workers)}
    print(f"\npeak memory preparing with {workers} workers (fresh process each):")
    print("| input | MB | MB/s | main process MiB | largest worker MiB |")
    print("| --- | --- | --- | --- | --- |")
    for label, m in memory.items():
        print(f"| {label} | {m['input_mb']:.0f} | {m['mb_per_s']:.2f} | {m['main_mib']:.0f} | {m['worker_mib']:.0f} |")
    growth = memory["x10"]["main_mib"] / memory["x1"]["main_mib"]
    print(f"main-process memory x{growth:.2f} for x10 the data")
    return {"speeds": rows, "memory": memory, "memory_growth_x10": growth}


def bench_loader(args, tokenizer: Tokenizer, scratch: Path) -> dict:
    prepared = scratch / "loader"
    prepare([str(args.data)], tokenizer, prepared, PrepareOptions(workers=max(args.workers)), show_progress=False,
            log=lambda m: None)
    stream = PreparedData(prepared).split("train")
    cfg = load_config(args.config, [f"train.batch_size={args.batch_size}", f"train.seq_len={args.seq_len}",
                                     "train.device=cpu"])
    t = cfg.train
    torch.set_flush_denormal(True)
    seed_everything(t.seed)
    layouts = {
        "packed": make_rows(stream, "packed", t.seq_len, tokenizer),
        "packed+document mask": make_rows(stream, "packed", t.seq_len, tokenizer, document_mask=True),
        "padded": make_rows(stream, "padded", t.seq_len, tokenizer),
    }
    samplers = {name: MixtureSampler([(name, rows)], [1.0], t.seed) for name, rows in layouts.items()}
    model = MiniMind(cfg.model)
    optimizer = build_optimizer(model, cfg.optim, "cpu")
    autocast, scaler = mixed_precision(torch.device("cpu"), torch.float32)
    timings = {name: {"load": [], "step": [], "useful": []} for name in layouts}
    for step in range(args.warmup + args.steps):  # layouts in turn, one step each
        for name, sampler in samplers.items():
            start = time.perf_counter()
            batch = sampler.next_batch(t.batch_size)
            loaded = time.perf_counter()
            accumulate_gradients(model, [batch], autocast, scaler)  # one process on the CPU
            apply_gradients(model, optimizer, scaler, cfg.optim.grad_clip)
            done = time.perf_counter()
            if step >= args.warmup:
                timings[name]["load"].append(loaded - start)
                timings[name]["step"].append(done - loaded)
                pad = (batch.inputs == tokenizer.pad_id) & (batch.labels == -100)
                timings[name]["useful"].append(int((~pad).sum()))

    # Over the whole corpus: positions holding data, and tokens left out (packed: the final partial row;
    # padded: the part of each document beyond seq_len).
    doc_lengths = np.asarray([len(stream.document(i)) for i in range(stream.num_documents)])  # with eos
    padded_filled = np.minimum(doc_lengths + 1, t.seq_len)  # + bos
    packed_rows = stream.num_tokens // t.seq_len
    corpus = {
        "packed": {"position_waste": 0.0,
                   "tokens_left_out": (stream.num_tokens - packed_rows * t.seq_len) / stream.num_tokens},
        "padded": {"position_waste": 1 - padded_filled.sum() / (len(doc_lengths) * t.seq_len),
                   "tokens_left_out": np.maximum(doc_lengths + 1 - t.seq_len, 0).sum() / (doc_lengths + 1).sum()},
    }
    corpus["packed+document mask"] = corpus["packed"]

    print(f"\n{Path(args.config).stem} on CPU ({torch.get_num_threads()} threads), batch {t.batch_size} x seq "
          f"{t.seq_len}, {args.steps} steps per layout (medians):")
    print("| layout | batch build ms | step s | loader overhead | useful tokens/step | useful tokens/s | "
          "positions wasted (corpus) | tokens left out (corpus) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    results = {}
    positions = t.batch_size * t.seq_len
    for name, tm in timings.items():
        load, step_s = statistics.median(tm["load"]), statistics.median(tm["step"])
        # Useful tokens per step from the corpus-wide fill rate: a handful of sampled batches is too few to say.
        useful = positions * (1 - corpus[name]["position_waste"])
        results[name] = {"load_ms": 1e3 * load, "step_s": step_s, "loader_overhead": load / step_s,
                         "useful_tokens_per_step": useful, "useful_tokens_per_s": useful / (load + step_s),
                         "sampled_useful_tokens_per_step": statistics.mean(tm["useful"]),
                         **corpus[name], "load_times_s": tm["load"], "step_times_s": tm["step"]}
        r = results[name]
        print(f"| {name} | {r['load_ms']:.2f} | {step_s:.3f} | {100 * r['loader_overhead']:.3f}% | {useful:,.0f} | "
              f"{r['useful_tokens_per_s']:,.0f} | {100 * r['position_waste']:.2f}% | "
              f"{100 * r['tokens_left_out']:.2f}% |")
    ratio = results["packed"]["useful_tokens_per_s"] / results["padded"]["useful_tokens_per_s"]
    print(f"packed / padded useful tokens per second: {ratio:.2f}x")
    return {"layouts": results, "packed_over_padded": ratio}


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--tokenizer", help="tokenizer directory (default: a 6400-token one trained on --data, cached)")
    p.add_argument("--only", choices=("prepare", "loader"), help="run one part")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeats", type=int, default=3, help="preparation runs per worker count")
    p.add_argument("--config", default=str(ROOT / "configs" / "minimind2-26m.toml"))
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if not args.data.is_file():
        sys.exit(f"error: {args.data} not found (pass --data)")
    RESULTS.mkdir(parents=True, exist_ok=True)
    result = {"data": str(args.data), "torch": torch.__version__}
    with tempfile.TemporaryDirectory(prefix="minipretrain-bench-") as tmp:
        scratch = Path(tmp)
        tokenizer = get_tokenizer(args, scratch)
        if args.only in (None, "prepare"):
            result["prepare"] = bench_prepare(args, tokenizer, scratch)
        if args.only in (None, "loader"):
            result["loader"] = bench_loader(args, tokenizer, scratch)
    out = RESULTS / f"data-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {out}")
    return result


if __name__ == "__main__":
    main()
