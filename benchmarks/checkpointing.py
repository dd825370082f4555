"""How long a checkpoint save stalls training, with and without train.async_save.

    python benchmarks/checkpointing.py --config configs/minimind2-26m.toml --repeats 5

A real model and AdamW (after one step, so the moments exist) are saved through the trainer's own
CheckpointSaver into a temporary run directory, sync and async saves alternating. The stall is the time the
training thread spends in save(): the whole write when synchronous; the copy to CPU memory (plus the small files)
when async. "complete" is until the checkpoint is renamed into place and `latest` points to it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from minipretrain.config import load_config
from minipretrain.model import MiniMind
from minipretrain.tokenizer import train_tokenizer
from minipretrain.train.checkpoint import CheckpointSaver
from minipretrain.train.optim import build_optimizer


def _model_and_optimizer(cfg):
    model = MiniMind(cfg.model)
    optimizer = build_optimizer(model, cfg.optim, "cpu")
    batch = torch.randint(0, cfg.model.vocab_size, (1, 64))
    model(batch, labels=batch).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return model, optimizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/minimind2-26m.toml")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dir", help="where to write (default: a temporary directory; choose the disk to measure)")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")

    cfg = load_config(args.config)
    model, optimizer = _model_and_optimizer(cfg)
    tokenizer = train_tokenizer(["hello world " * 50], 300, show_progress=False)  # saved along: two small files
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        results: dict[str, dict[str, list[float]]] = {"sync": {"stall_s": [], "complete_s": []},
                                                      "async": {"stall_s": [], "complete_s": []}}
        savers = {mode: CheckpointSaver(Path(tmp) / mode, keep=1, async_save=mode == "async")
                  for mode in results}
        for i in range(args.repeats):
            for mode, saver in savers.items():
                start = time.perf_counter()
                saver.save(i + 1, model, optimizer, cfg, tokenizer, {"step": i + 1})
                stall = time.perf_counter() - start
                saver.wait()
                results[mode]["stall_s"].append(stall)
                results[mode]["complete_s"].append(time.perf_counter() - start)
        for saver in savers.values():
            saver.close()
    size = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"{args.config}: {size:.1f}M parameters, AdamW state; median of {args.repeats} saves each, alternating")
    print("| save | training stall | until complete |\n| --- | --- | --- |")
    medians = {mode: {k: statistics.median(v) for k, v in r.items()} for mode, r in results.items()}
    for mode, m in medians.items():
        print(f"| {mode} | {m['stall_s']:.2f} s | {m['complete_s']:.2f} s |")
    print(f"stall ratio async / sync: {medians['async']['stall_s'] / medians['sync']['stall_s']:.2f}")
    if args.out:
        Path(args.out).write_text(json.dumps({"config": args.config, "results": results, "medians": medians},
                                             indent=2) + "\n")


if __name__ == "__main__":
    main()
