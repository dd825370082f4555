"""Training speed against MiniMind's own trainer, side by side on the same model, batch and data.

    python benchmarks/vs_minimind.py --peer-python /tmp/mmvenv/bin/python     # a venv with the peer's packages

The peer (`../shared/peers/minimind`, unmodified) is copied to a scratch directory and run as its README says, on
the CPU (where it trains in float32). minipretrain trains the same model: MiniMind-3's layout (8 heads / 4 kv heads,
SwiGLU width ceil(hidden*pi/64)*64, QK-norm, rms eps 1e-6, tied embeddings, the peer's tokenizer), the padded
layout (bos + text + eos per row, as the peer's loader), batch x seq positions per step, once in float32 and once
in bfloat16 autocast. The runs alternate (peer, ours fp32, ours bf16, then again) so drift on a shared machine hits
all alike. Step time: the peer's, between consecutive per-step log lines; ours, the step time metrics.jsonl
records (tokens_per_s with log_every=1). Each run's median over the steps after --warmup.

--moe compares the mixture-of-experts model instead (the peer's `--use_moe 1`: every SwiGLU becomes 4 experts of the
same width, top-1 with the weight renormalised, balancing loss 5e-4 over the batch; its dispatch loops over the
experts with a boolean mask each). minipretrain trains the same shape with its sort-based dispatch.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--peer-python", required=True, help="a Python with the peer's packages (see its README)")
    p.add_argument("--peer", type=Path, default=SHARED / "peers" / "minimind", help="the peer's directory")
    p.add_argument("--data", type=Path, default=SHARED / "data" / "sample_pretrain.jsonl")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--steps", type=int, default=20, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--moe", action="store_true", help="both trainers train the mixture-of-experts model")
    p.add_argument("--json", type=Path, help="default: benchmarks/results/vs-minimind[-moe].json")
    args = p.parse_args(argv)
    args.json = args.json or ROOT / "benchmarks" / "results" / f"vs-minimind{'-moe' if args.moe else ''}.json"
    return args


def peer_step_times(args, scratch: Path, data: Path) -> list[float]:
    peer = scratch / "peer"
    shutil.rmtree(peer, ignore_errors=True)
    shutil.copytree(args.peer, peer)  # it writes ../checkpoints and ../out relative to trainer/
    cmd = [args.peer_python, "-u", "train_pretrain.py", "--device", "cpu", "--hidden_size", str(args.hidden),
           "--num_hidden_layers", str(args.layers), "--max_seq_len", str(args.seq_len), "--batch_size",
           str(args.batch_size), "--epochs", "1", "--accumulation_steps", "1", "--log_interval", "1",
           "--save_interval", "100000", "--num_workers", "1", "--data_path", str(data), "--save_dir",
           str(peer / "out"), "--use_moe", str(int(args.moe))]
    stamps = []
    with subprocess.Popen(cmd, cwd=peer / "trainer", stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True) as proc:
        for line in proc.stdout:
            if line.startswith("Epoch:["):
                stamps.append(time.perf_counter())
                if len(stamps) == args.warmup + args.steps + 1:
                    proc.kill()  # the last step's save is not part of the comparison
                    break
    if len(stamps) < args.warmup + args.steps + 1:
        sys.exit(f"the peer logged {len(stamps)} steps, fewer than {args.warmup + args.steps + 1}: {' '.join(cmd)}")
    return [b - a for a, b in itertools.pairwise(stamps)][args.warmup:]


def our_step_times(args, scratch: Path, data: Path, dtype: str) -> list[float]:
    run = scratch / f"ours-{dtype}"
    sets = {"model.hidden_size": args.hidden, "model.num_hidden_layers": args.layers,
            "model.num_attention_heads": 8, "model.num_key_value_heads": 4,
            "model.intermediate_size": math.ceil(args.hidden * math.pi / 64) * 64, "model.qk_norm": "true",
            "model.rms_norm_eps": 1e-6, "model.vocab_size": 6400, "data.tokenizer": args.peer / "model",
            "data.path": data, "data.layout": "padded", "data.val_fraction": 0, "train.batch_size": args.batch_size,
            "train.seq_len": args.seq_len, "train.max_steps": args.warmup + args.steps + 1, "train.eval_every": 0,
            "train.save_every": 0, "train.sample_tokens": 1, "train.device": "cpu", "train.dtype": dtype,
            "optim.name": "adamw"}  # the peer's optimizer: the same work per step
    if args.moe:  # the peer's MoE: 4 experts as wide as the dense SwiGLU, top-1, balancing over the whole batch
        sets.update({"model.moe": "true", "model.num_experts": 4, "model.num_experts_per_tok": 1,
                     "model.router_aux_loss_coef": 5e-4, "model.seq_aux": "false"})
    cmd = [sys.executable, "-m", "minipretrain", "train", "--config", str(ROOT / "configs" / "minimind2-26m.toml"),
           "--run-dir", str(run), "--overwrite", "--no-progress"]
    for key, value in sets.items():
        cmd += ["--set", f"{key}={value}"]
    subprocess.run(cmd, check=True, capture_output=True)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    tokens_per_step = args.batch_size * args.seq_len
    times = [tokens_per_step / r["tokens_per_s"] for r in records if "tokens_per_s" in r]
    return times[args.warmup : args.warmup + args.steps]


def main(argv=None) -> dict:
    args = parse_args(argv)
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from throughput import cpu_description

    with tempfile.TemporaryDirectory(prefix="vs-minimind-") as tmp:
        scratch = Path(tmp)
        rows = args.batch_size * (args.warmup + args.steps + 2)
        data = scratch / "data.jsonl"
        with open(args.data, encoding="utf-8") as src:
            data.write_text("".join(line for _, line in zip(range(rows), src, strict=False)), encoding="utf-8")
        runs = {"MiniMind trainer (float32)": [], "minipretrain float32": [], "minipretrain bfloat16": []}
        for repeat in range(args.repeats):
            for name in runs:
                print(f"repeat {repeat + 1}/{args.repeats}: {name} ...", flush=True)
                if name.startswith("MiniMind"):
                    runs[name] += peer_step_times(args, scratch, data)
                else:
                    runs[name] += our_step_times(args, scratch, data, name.split()[-1])
    tokens_per_step = args.batch_size * args.seq_len
    peer_median = statistics.median(runs["MiniMind trainer (float32)"])
    hardware = cpu_description()
    print(f"\n{hardware}; {'MoE (4 experts, top-1), ' if args.moe else ''}hidden {args.hidden}, {args.layers} layers, "
          f"batch {args.batch_size} x seq {args.seq_len}, "
          f"{args.repeats} x {args.steps} timed steps per run\n")
    print("| trainer | median step | tokens/s | vs MiniMind |\n|---|---|---|---|")
    results = []
    for name, times in runs.items():
        median = statistics.median(times)
        results.append({"trainer": name, "median_s": median, "tokens_per_s": tokens_per_step / median,
                        "speedup_vs_peer": peer_median / median, "step_times_s": times})
        print(f"| {name} | {median:.3f} s | {tokens_per_step / median:,.0f} | {peer_median / median:.2f}x |")
    result = {"hardware": hardware, "moe": args.moe, "hidden": args.hidden, "layers": args.layers,
              "batch_size": args.batch_size, "seq_len": args.seq_len, "steps": args.steps, "warmup": args.warmup,
              "repeats": args.repeats, "runs": results}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.json}")
    return result


if __name__ == "__main__":
    main()
