"""Mixture of experts against the dense model with the same active parameters, and the MoE layer's dispatch cost.

    python benchmarks/moe.py --config configs/tiny-moe.toml
    python benchmarks/moe.py --config configs/minimind2-moe.toml --batch-size 2 --seq-len 256 --steps 6

1. Training step: the preset's MoE and its dense twin (same model, one SwiGLU as wide as the experts a token passes
   through: (num_experts_per_tok + num_shared_experts) * moe_intermediate_size), the real training step of
   benchmarks/throughput.py on random tokens, in alternating blocks of steps; medians.
2. The feed-forward layer alone, forward + backward on batch x seq tokens: the MoE layer (router, sort, the experts,
   un-permute) against the dense SwiGLU of the same active width, which does the same matmul FLOPs. The ratio is
   what routing and dispatch cost on top of the arithmetic.
MiniMind's own MoE trainer side by side: benchmarks/vs_minimind.py --moe.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import Trainer, cpu_description, make_optimizer, run_interleaved, warn_if_busy, write_result

from minipretrain.config import DTYPE_NAMES, load_config
from minipretrain.data.batches import Batch
from minipretrain.errors import UserError
from minipretrain.model import FeedForward, MiniMind
from minipretrain.moe import MoEFeedForward
from minipretrain.parallel import resolve_device
from minipretrain.precision import configure_device, mixed_precision, resolve_precision
from minipretrain.train.loop import seed_everything

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True, help="an MoE preset, e.g. configs/tiny-moe.toml")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override (repeatable)")
    p.add_argument("--batch-size", type=int, help="default: train.batch_size of the preset")
    p.add_argument("--seq-len", type=int, help="default: train.seq_len of the preset")
    p.add_argument("--steps", type=int, default=10, help="timed training steps per model")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--block", type=int, default=2, help="steps per model before switching")
    p.add_argument("--layer-repeats", type=int, default=30, help="timed forward+backward passes per layer")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", choices=DTYPE_NAMES)
    p.add_argument("--json", type=Path, help="default: benchmarks/results/moe-<preset>.json")
    return p.parse_args(argv)


def dense_twin(cfg):
    """The same model with one SwiGLU per layer as wide as the experts each token uses."""
    twin = copy.deepcopy(cfg)
    m = twin.model
    m.intermediate_size = (m.num_experts_per_tok + m.num_shared_experts) * m.moe_intermediate_size
    m.moe = False
    return twin


def time_layers(cfg, device, autocast, tokens: int, repeats: int) -> dict:
    """Median seconds of forward + backward of the MoE layer and of the dense SwiGLU of the same active width,
    interleaved."""
    m = cfg.model
    torch.manual_seed(0)
    moe = MoEFeedForward(m, make_expert=lambda width: FeedForward(m.hidden_size, width)).to(device).train()
    dense = FeedForward(m.hidden_size, dense_twin(cfg).model.intermediate_size).to(device).train()
    x = torch.randn(1, tokens, m.hidden_size, device=device)
    times = {"moe": [], "dense": []}
    for i in range(repeats + 2):
        for name, layer in (("moe", moe), ("dense", dense)):
            sync(device)
            start = time.perf_counter()
            with autocast:
                y = layer(x)
            y.float().square().mean().backward()
            sync(device)
            if i >= 2:
                times[name].append(time.perf_counter() - start)
            layer.zero_grad(set_to_none=True)
    return {name: statistics.median(t) for name, t in times.items()}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv=None) -> dict:
    args = parse_args(argv)
    overrides = [*args.set, f"train.device={args.device}", f"train.dtype={args.dtype}"]
    overrides += [f"train.batch_size={args.batch_size}"] * bool(args.batch_size)
    overrides += [f"train.seq_len={args.seq_len}"] * bool(args.seq_len)
    try:
        cfg = load_config(args.config, overrides)
        device = resolve_device(cfg.train.device)
        dtype = resolve_precision(cfg.train.dtype, device).dtype
    except UserError as e:
        sys.exit(f"error: {e}")
    if not cfg.model.moe:
        sys.exit(f"error: {args.config} is not a mixture of experts (model.moe = false)")
    m, t, preset = cfg.model, cfg.train, Path(args.config).stem
    configure_device(device)
    seed_everything(t.seed)
    gen = torch.Generator().manual_seed(t.seed)
    inputs = [torch.randint(0, m.vocab_size, (t.batch_size, t.seq_len), generator=gen) for _ in range(8)]
    batches = [Batch(x, x.clone()) for x in inputs]
    trainers, sizes = [], {}
    for name, variant in (("MoE", cfg), ("dense, same active", dense_twin(cfg))):
        model = MiniMind(variant.model).to(device)
        optimizer, _ = make_optimizer(model, variant, device.type, None)
        trainers.append(Trainer(model, optimizer, name, variant, device, dtype, batches))
        sizes[name] = (model.num_parameters(), model.num_active_parameters())
    tokens_per_step = t.batch_size * t.seq_len
    hardware = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_description()
    print(f"{preset} on {device} ({hardware}; torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{str(dtype).removeprefix('torch.')}); batch {t.batch_size} x seq {t.seq_len}; {m.num_experts} experts, "
          f"top {m.num_experts_per_tok}, {m.num_shared_experts} shared, expert width {m.moe_intermediate_size}")
    busy = warn_if_busy()
    run_interleaved(trainers, args.warmup, args.steps, args.block)
    autocast, _ = mixed_precision(device, dtype)
    layers = time_layers(cfg, device, autocast, tokens_per_step, args.layer_repeats)

    print("\n| model | parameters | active | median step s | tokens/s |\n|---|---|---|---|---|")
    runs = []
    for tr in trainers:
        total, active = sizes[tr.name]
        median = statistics.median(tr.times)
        runs.append({"model": tr.name, "parameters": total, "active_parameters": active, "median_s": median,
                     "tokens_per_s": tokens_per_step / median, "step_times_s": tr.times})
        print(f"| {preset} {tr.name} | {total / 1e6:.2f}M | {active / 1e6:.2f}M | {median:.3f} | "
              f"{tokens_per_step / median:,.0f} |")
    ratio = runs[0]["tokens_per_s"] / runs[1]["tokens_per_s"]
    overhead = layers["moe"] / layers["dense"]
    print(f"\nMoE step throughput: {ratio:.2f}x the dense model with the same active parameters")
    print(f"feed-forward layer alone ({tokens_per_step} tokens, forward + backward): MoE {1e3 * layers['moe']:.2f} ms,"
          f" dense of the same active width {1e3 * layers['dense']:.2f} ms: dispatch costs {overhead:.2f}x")
    result = {"preset": preset, "hardware": hardware, "device": str(device), "dtype": str(dtype), "torch":
              torch.__version__, "batch_size": t.batch_size, "seq_len": t.seq_len, "steps": args.steps,
              "runs": runs, "moe_vs_dense_tokens_per_s": ratio, "layer_median_s": layers,
              "layer_moe_vs_dense": overhead, "cpu_busy_before": busy}
    write_result(args.json or ROOT / "benchmarks" / "results" / f"moe-{preset}.json", result)
    return result


if __name__ == "__main__":
    main()
