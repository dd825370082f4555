"""What a fixed training budget buys: held-out bits per byte of one model shape over optimizers, learning rates,
schedules and seeds.

    python benchmarks/quality.py --out /tmp/quality                  # the default grid, 2 seeds
    python benchmarks/quality.py --out /tmp/quality --tokens 300000 --seeds 1 --adamw-lrs 2e-3 --muon-lrs 4e-3

Every run is `minipretrain train` of one ~5M-parameter shape (the tiny preset widened: hidden 256, 6 layers, 8 heads /
4 kv heads, vocab 4096, batch 16 x 256) on a fixed mixture from ../shared/data/ (English: tinyshakespeare; Chinese:
Journey to the West; code: the CPython 3.11.7 standard library; a third each), for the same number of tokens. Then
`minipretrain eval --dtype float32` scores each corpus's held-out documents (every 50th, never trained on). The
score of a run is the mean of the three corpora's bits per byte (a tokenizer-independent compression rate), each
weighing a third as in training; the table also gives each corpus's.

The grid: AdamW and Muon (optim.name) with a cosine schedule at each of their peak learning rates (--adamw-lrs,
--muon-lrs: three or four each, bracketing each one's best), and with WSD at the best of them (--adamw-wsd-lrs,
--muon-wsd-lrs: chosen from earlier, smaller grids); --seeds seeds per cell (train.seed: initial weights, data order). A
Muon cell runs AdamW (embedding, norms) at the same peak unless it says otherwise. Each cell reports the median over
seeds and the spread (max - min), and its change against the baseline, AdamW + cosine at --default-lr (MiniMind's
optimizer and schedule, and the tiny preset's settings before this benchmark chose Muon). Then the best cell is run
again at other batch sizes (--batch-sizes; the same tokens, so more or fewer steps) and warmup lengths (--warmups, as a
share of the steps; the grid uses 5%), and, when it is a Muon cell, with AdamW's peak at --split-adamw-lr instead of
Muon's (the MiniMind presets' split), with --extra-seeds seeds each. Finished runs found in --out are reused (same
command), so the grid can be grown; the preset file and the code are not compared, so after changing either use a fresh
--out.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

import continual  # benchmarks/ is on sys.path when a script in it runs: its data preparation and CLI helpers
from throughput import cpu_description, write_result

SEQ_LEN, BATCH_SIZE, WARMUP = 256, 16, 0.05  # the grid's rows, rows per step and warmup share of the steps
SHAPE = ["model.hidden_size=256", "model.num_hidden_layers=6", "model.num_attention_heads=8",
         "model.num_key_value_heads=4", f"train.batch_size={BATCH_SIZE}", f"train.seq_len={SEQ_LEN}"]
MIXTURE = {"shakespeare": 1 / 3, "zh": 1 / 3, "code": 1 / 3}


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path("/tmp/minipretrain-quality"), help="data and runs (reused)")
    p.add_argument("--tokens", type=int, default=1_200_000, help="training tokens per run (16 x 256 = 4,096 a step)")
    p.add_argument("--seeds", type=int, default=2, help="seeds per cell")
    p.add_argument("--adamw-lrs", default="5e-4,1e-3,2e-3", help="AdamW's peak learning rates (cosine cells)")
    p.add_argument("--muon-lrs", default="2e-3,4e-3,8e-3,1.6e-2", help="Muon's peak learning rates (cosine cells)")
    p.add_argument("--adamw-wsd-lrs", default="1e-3", help="AdamW's WSD cells (its best cosine lr, measured)")
    p.add_argument("--muon-wsd-lrs", default="4e-3,8e-3", help="Muon's WSD cells")
    p.add_argument("--default-lr", type=float, default=2e-3, help="the baseline: AdamW + cosine at this lr")
    p.add_argument("--batch-sizes", default="8,32", help="the best cell again at these rows per step (same tokens)")
    p.add_argument("--warmups", default="0.2", help="the best cell again with these warmup shares of the steps")
    p.add_argument("--split-adamw-lr", type=float, default=1e-3,
                   help="the best cell (if Muon) again with AdamW's peak here (0: not)")
    p.add_argument("--extra-seeds", type=int, default=1, help="seeds of each batch-size, warmup and split run")
    p.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "quality.json")
    args = p.parse_args(argv)
    if args.tokens < 4096 or args.seeds < 1 or args.extra_seeds < 0:
        p.error("--tokens must be at least one step (4,096), --seeds at least 1 and --extra-seeds at least 0")
    try:
        args.batch_sizes = [int(v) for v in args.batch_sizes.split(",") if v]
        args.warmups = [float(v) for v in args.warmups.split(",") if v]
    except ValueError as e:
        p.error(f"--batch-sizes takes integers and --warmups numbers, comma-separated: {e}")
    if any(b < 1 or args.tokens < b * SEQ_LEN for b in args.batch_sizes) or any(not 0 <= w < 1 for w in args.warmups):
        p.error("--batch-sizes must be at least 1 (and one step must fit in --tokens), --warmups in [0, 1)")
    if args.default_lr not in [float(v) for v in args.adamw_lrs.split(",") if v]:
        p.error(f"--default-lr {args.default_lr:g} must be one of --adamw-lrs: it is the baseline's cell")
    if args.split_adamw_lr < 0:
        p.error("--split-adamw-lr must be >= 0")
    return args


def cells(args) -> list[dict]:
    out = []
    for optimizer, lrs, wsd_lrs in (("adamw", args.adamw_lrs, args.adamw_wsd_lrs),
                                    ("muon", args.muon_lrs, args.muon_wsd_lrs)):
        for lr in (float(v) for v in lrs.split(",") if v):
            out.append({"optimizer": optimizer, "schedule": "cosine", "lr": lr})
        for lr in (float(v) for v in wsd_lrs.split(",") if v):
            out.append({"optimizer": optimizer, "schedule": "wsd", "lr": lr})
    return out


def extra_cells(args, best: dict) -> list[dict]:
    """The best cell at each other batch size and warmup share."""
    return ([{**best, "batch_size": b} for b in args.batch_sizes if b != BATCH_SIZE]
            + [{**best, "warmup": w} for w in args.warmups if w != WARMUP]
            + [{**best, "adamw_lr": args.split_adamw_lr}] * (best["optimizer"] == "muon" and args.split_adamw_lr > 0))


def cell_name(cell: dict) -> str:
    return (f"{cell['optimizer']}-{cell['schedule']}-lr{cell['lr']:g}"
            + (f"-batch{cell['batch_size']}" if "batch_size" in cell else "")
            + (f"-warmup{cell['warmup']:g}" if "warmup" in cell else "")
            + (f"-adamw{cell['adamw_lr']:g}" if "adamw_lr" in cell else ""))


def steps_of(cell: dict, tokens: int) -> int:
    return tokens // (cell.get("batch_size", BATCH_SIZE) * SEQ_LEN)


def overrides(cell: dict, seed: int, tokens: int, prepared: dict, tokenizer: Path) -> list[str]:
    steps = steps_of(cell, tokens)
    warmup = max(1, steps // 20) if "warmup" not in cell else round(cell["warmup"] * steps)
    shape = [f"train.batch_size={cell['batch_size']}" if o.startswith("train.batch_size=") and "batch_size" in cell
             else o for o in SHAPE]
    return [*shape, continual.sources(MIXTURE, prepared), f"data.tokenizer={json.dumps(str(tokenizer))}",
            f"optim.name={cell['optimizer']}", f"optim.schedule={cell['schedule']}",
            *([f"optim.lr={cell['lr']}", f"optim.min_lr={cell['lr'] / 10}"] if "adamw_lr" not in cell else
              [f"optim.lr={cell['adamw_lr']}", f"optim.min_lr={cell['adamw_lr'] / 10}", f"optim.muon_lr={cell['lr']}"]),
            f"optim.warmup_steps={warmup}",
            f"train.max_steps={steps}", f"train.seed={seed}", "train.eval_every=0", "train.save_every=0",
            "train.sample_every=0", "train.sample_tokens=1"]


def mixture_bits_per_byte(scores: dict[str, dict]) -> float:
    """The corpora's bits per byte weighted as the training mixture weighs them."""
    return sum(MIXTURE[name] * s["bits_per_byte"] for name, s in scores.items()) / sum(MIXTURE[n] for n in scores)


def summarize(grid: list[dict], grid_cells: list[dict]) -> list[dict]:
    """One row per cell, in order: median and spread over its seeds, median training time, per-corpus medians."""
    rows = []
    for cell in grid_cells:
        runs = [g for g in grid if cell_name(g) == cell_name(cell)]
        values = [g["bpb"] for g in runs]
        rows.append({**cell, "median_bpb": statistics.median(values), "spread": max(values) - min(values),
                     "seeds": len(values), "median_train_s": statistics.median(g["train_s"] for g in runs),
                     "median_bpb_by_corpus": {name: statistics.median(g["bpb_by_corpus"][name] for g in runs)
                                              for name in runs[0]["bpb_by_corpus"]}})
    return rows


def main(argv=None) -> dict:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    tokenizer = continual.train_tokenizer(args.out / "tokenizer", 0.02, 2_000_000, 4096)
    prepared = {name: path for name, path in continual.prepare(args.out, tokenizer, 0.02).items() if name in MIXTURE}
    steps = args.tokens // (BATCH_SIZE * SEQ_LEN)
    print(f"{steps} steps x {BATCH_SIZE * SEQ_LEN:,} tokens per run; {cpu_description()}", flush=True)
    grid, start = [], time.perf_counter()

    def run(cell: dict, seed: int) -> None:
        name = f"{cell_name(cell)}-seed{seed}"
        summary, _ = continual.train(args.out / "runs" / name, overrides(cell, seed, args.tokens, prepared, tokenizer))
        scores = continual.evaluate(args.out / "runs" / name, prepared)
        grid.append({**cell, "seed": seed, "bpb": mixture_bits_per_byte(scores),
                     "train_s": summary["elapsed_s"],
                     "bpb_by_corpus": {n: s["bits_per_byte"] for n, s in scores.items()}})
        print(f"  {name}: {grid[-1]['bpb']:.4f} bits/byte ({summary['elapsed_s']:.0f} s)", flush=True)

    for seed in range(1337, 1337 + args.seeds):  # seed-major: a partial grid already covers every cell once
        for cell in cells(args):
            run(cell, seed)
    rows = summarize(grid, cells(args))
    baseline = next(r for r in rows if (r["optimizer"], r["schedule"], r["lr"]) == ("adamw", "cosine", args.default_lr))
    best_row = min(rows, key=lambda r: r["median_bpb"])
    best = cells(args)[rows.index(best_row)]
    extras = extra_cells(args, best) if args.extra_seeds else []
    for seed in range(1337, 1337 + args.extra_seeds):
        for cell in extras:
            run(cell, seed)
    rows += summarize(grid, extras)
    best_adamw = min((r for r in rows if r["optimizer"] == "adamw"), key=lambda r: r["median_bpb"])
    print(f"\n{datetime.date.today()}, {cpu_description()}: {steps * BATCH_SIZE * SEQ_LEN:,} tokens per run ({steps} "
          f"steps of {BATCH_SIZE} x {SEQ_LEN} unless the batch says otherwise), {args.seeds} seed(s) per cell of the "
          f"grid, {args.extra_seeds} per variant of the best; held-out bits per byte, the mean of English, Chinese and "
          f"code; against AdamW + cosine at {args.default_lr:g} (the baseline)\n")
    print("| optimizer | schedule | peak lr | batch | warmup | bits/byte (median) | seeds | spread (max - min) "
          "| vs baseline | English | Chinese | code | train s |\n" + "|---" * 13 + "|")
    for r in rows:
        lr = f"{r['lr']:g}" + (f", AdamW {r['adamw_lr']:g}" if "adamw_lr" in r else "")
        spread = f"{r['spread']:.4f}" if r["seeds"] > 1 else "n/a"
        by_corpus = " | ".join(f"{r['median_bpb_by_corpus'][n]:.4f}" for n in ("shakespeare", "zh", "code"))
        print(f"| {r['optimizer']} | {r['schedule']} | {lr} | {r.get('batch_size', BATCH_SIZE)} "
              f"| {r.get('warmup', WARMUP):.0%} | {r['median_bpb']:.4f} | {r['seeds']} | {spread} "
              f"| {r['median_bpb'] / baseline['median_bpb'] - 1:+.1%} | {by_corpus} | {r['median_train_s']:.0f} |")
    top = best_row["median_bpb"]
    print(f"\nbest cell: {cell_name(best)}, {top:.4f} bits/byte: {top / baseline['median_bpb'] - 1:+.1%} against the "
          f"baseline, {top / best_adamw['median_bpb'] - 1:+.1%} against the best AdamW cell ({cell_name(best_adamw)})")
    result = {"date": str(datetime.date.today()), "cpu": cpu_description(),
              "tokens_per_run": steps * BATCH_SIZE * SEQ_LEN, "steps": steps, "best": cell_name(best),
              "shape": SHAPE, "mixture": MIXTURE, "seeds": args.seeds, "rows": rows, "runs": grid,
              "minutes": round((time.perf_counter() - start) / 60, 1),
              "command": " ".join(["python", "benchmarks/quality.py", *sys.argv[1:]])}
    write_result(args.json, result)
    return result


if __name__ == "__main__":
    main()
