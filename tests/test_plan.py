"""`minipretrain plan`: every formula against numbers worked out by hand, the flags it refuses, and the memory
estimate against the peak measured by running real training steps."""

import json
import math

import pytest
import torch
from conftest import TINY_MODEL, assert_cli_errors, shared_file

from minipretrain.config import load_config
from minipretrain.errors import UserError
from minipretrain.plan import (
    PlanOptions,
    activation_bytes_per_token,
    compute_optimal,
    corpus_tokens,
    count_parameters,
    gpu_hours_to_flops,
    largest_batch,
    make_plan,
    measure,
    memory_estimate,
    pipeline_bubble,
    tokens_per_step,
)

# TINY_MODEL by hand: vocab V=320, hidden h=32, 2 layers, 4 heads of 8, 2 kv heads (kv width 16), SwiGLU width
# i = 64 * ceil(8 * 32 / 3 / 64) = 128.
V, H, LAYERS, FFN = 320, 32, 2, 128
PER_LAYER = (H * H + 2 * H * 16 + H * H) + 3 * H * FFN + 2 * H  # q, k, v, o; gate, up, down; two RMSNorm weights
TOTAL = V * H + LAYERS * PER_LAYER + H  # tied embedding once, final norm
MATRICES = LAYERS * (PER_LAYER - 2 * H) + V * H  # every Linear weight, lm_head (the embedding) included


def tiny(*overrides: str):
    return load_config(None, [*TINY_MODEL, "train.batch_size=4", "train.seq_len=32", *overrides])


def test_parameter_counts_match_hand_count():
    counts = count_parameters(tiny().model)
    assert (PER_LAYER, TOTAL) == (15_424, 41_120)
    assert counts.total == TOTAL and counts.per_layer == PER_LAYER
    assert counts.embedding == V * H and counts.non_embedding == TOTAL - V * H
    assert counts.active == TOTAL and counts.matrices == MATRICES and counts.outside_layers == V * H + H
    assert counts.total == sum(p.numel() for p in __import__("minipretrain.model").model.MiniMind(tiny().model)
                               .parameters())


def test_moe_counts_active_parameters():
    cfg = tiny("model.moe=true", "model.num_experts=4", "model.num_experts_per_tok=1", "model.num_shared_experts=1")
    counts = count_parameters(cfg.model)
    expert = 3 * H * FFN
    per_layer = PER_LAYER - expert + H * 4 + 5 * expert  # the router, 4 routed and 1 shared expert
    assert counts.total == V * H + LAYERS * per_layer + H
    assert counts.active == counts.total - LAYERS * 3 * expert  # 3 routed experts idle per token


def test_flops_tokens_per_step_and_chinchilla_in_the_plan():
    plan = make_plan(tiny("train.grad_accum=3", "train.max_steps=10"), PlanOptions(devices=2))
    assert plan["flops"]["per_token"] == 6 * TOTAL + 12 * LAYERS * 4 * 8 * 32 == 271_296
    assert plan["batch"]["tokens_per_step"] == 4 * 2 * 3 * 32 == 768
    assert plan["batch"]["run_tokens"] == 7_680
    assert plan["chinchilla"]["optimal_tokens"] == 20 * TOTAL
    assert plan["chinchilla"]["optimal_steps"] == math.ceil(20 * TOTAL / 768) == 1071


def test_compute_optimal_size_from_a_budget():
    n, d = compute_optimal(1.2e21)  # C / 120 = 1e19
    assert n == pytest.approx(math.sqrt(1e19)) and d == pytest.approx(20 * math.sqrt(1e19))
    assert 6 * n * d == pytest.approx(1.2e21)
    assert gpu_hours_to_flops(100, 989, 0.4) == pytest.approx(100 * 3600 * 989e12 * 0.4)
    plan = make_plan(tiny(), PlanOptions(gpu_hours=10, gpu="A100", mfu=0.5))
    assert plan["budget"]["flops"] == pytest.approx(10 * 3600 * 312e12 * 0.5)  # A100 dense bf16: 312 TFLOP/s
    assert plan["budget"]["optimal_parameters"] == pytest.approx(math.sqrt(10 * 3600 * 312e12 * 0.5 / 120))
    # GPU names as a user types them: case does not matter
    lower_case = make_plan(tiny(), PlanOptions(gpu_hours=10, gpu="a100", mfu=0.5))
    assert lower_case["budget"]["flops"] == plan["budget"]["flops"]
    # With a known peak the time comes from peak x MFU: one GPU at 156 TFLOP/s achieved.
    assert plan["time"]["tokens_per_s"] == pytest.approx(156e12 / plan["flops"]["per_token"])


def test_tokens_per_step_and_pipeline_bubble():
    assert tokens_per_step(32, 8, 2, 512) == 262_144
    assert pipeline_bubble(4, 16) == pytest.approx(3 / 19)
    assert pipeline_bubble(4, 16, per_rank=2) == pytest.approx(3 / 35)  # interleaved: (p - 1) / (v*m + p - 1)
    assert pipeline_bubble(1, 8) == 0
    assert make_plan(tiny(), PlanOptions(pipeline_stages=8, microbatches=8))["pipeline"]["bubble"] == 7 / 15


def test_activation_bytes_by_hand():
    m = tiny().model
    norm = 2 * 4 * H + 4  # float32 input, x * rstd, rstd
    # bf16: three casts of the normed input (q, k, v), q + k + v, output + log-sum-exp; two casts (gate, up) + 4 x i
    bf16_layer = 2 * norm + (3 * 2 * H + 2 * (H + 2 * 16) + 2 * H + 4 * 4) + (2 * 2 * H + 4 * 2 * FFN)
    assert activation_bytes_per_token(m, 2) == (bf16_layer, norm + 2 * H + (2 + 12) * V) == (2072, 4804)
    fp32_layer = 2 * norm + (4 * H + 4 * (H + 2 * 16) + 4 * H + 4 * 4) + (4 * H + 4 * 4 * FFN)
    assert activation_bytes_per_token(m, 4) == (fp32_layer, norm + 4 * H + 16 * V) == (3224, 5508)


def test_memory_components_by_hand():
    cfg = tiny()
    counts = count_parameters(cfg.model)
    ddp = memory_estimate(0, counts, cfg.model, 4, 32, 1, 1, act_bytes=2)
    assert (ddp.weights, ddp.gradients, ddp.optimizer) == (4 * TOTAL, 4 * TOTAL, 8 * TOTAL)
    assert ddp.compute_weights == 2 * MATRICES and ddp.ddp_buckets == 0  # one device: no DDP wrapper
    assert ddp.rope_tables == 2 * 4 * 128 * 8  # float32 cos and sin, max_position_embeddings x head_dim
    rope = 4 * 32 * 8 * 2  # four bf16 seq x head_dim tables per layer
    assert ddp.activations == 4 * 32 * (2 * 2072 + 4804) + 2 * rope == 1_149_440
    # The peak is at the loss: activations all held, no gradient yet.
    assert ddp.total == 4 * TOTAL + 8 * TOTAL + 8192 + ddp.activations + 2 * MATRICES
    assert ddp.activations_checkpointed == 4 * 32 * (2 * 4 * H + 2072 + 4804) + rope
    # With gradient accumulation the earlier micro-batches' gradients are held too.
    accum = memory_estimate(0, counts, cfg.model, 4, 32, 2, 1, act_bytes=2)
    assert accum.total == ddp.total + 4 * TOTAL
    fp32 = memory_estimate(0, counts, cfg.model, 4, 32, 1, 1, act_bytes=4)
    assert fp32.compute_weights == 0 and fp32.activations == 4 * 32 * (2 * 3224 + 5508)
    # Muon keeps one float32 momentum buffer for each block matrix (q, k, v, o, gate, up, down) instead of AdamW's two
    # moments; the embedding and norms keep AdamW's.
    assert counts.muon_matrices == MATRICES - V * H
    muon = memory_estimate(0, counts, cfg.model, 4, 32, 1, 1, act_bytes=2, muon=True)
    assert muon.optimizer == 8 * TOTAL - 4 * (MATRICES - V * H)
    assert muon.total == ddp.total - 4 * (MATRICES - V * H)


def test_zero_stages_shard_the_right_states():
    cfg = tiny()
    counts = count_parameters(cfg.model)
    ddp, zero1, zero2, zero3 = (memory_estimate(s, counts, cfg.model, 4, 32, 1, 4, act_bytes=2) for s in range(4))
    n = TOTAL
    assert (ddp.weights, ddp.gradients, ddp.optimizer, ddp.ddp_buckets) == (4 * n, 4 * n, 8 * n, 4 * n)
    assert (zero1.weights, zero1.gradients, zero1.optimizer, zero1.ddp_buckets) == (4 * n, 4 * n, 2 * n, 0)
    for fsdp in (zero2, zero3):
        assert (fsdp.weights, fsdp.gradients, fsdp.optimizer) == (n, n, 2 * n)
    assert zero2.compute_weights == 2 * n  # every block's bf16 weights stay gathered
    assert zero3.compute_weights == 2 * (V * H + H + 2 * PER_LAYER)  # the root unit + two blocks in flight
    # Data parallelism splits no activation, and every rank holds the RoPE tables.
    assert len({(r.activations, r.rope_tables) for r in (ddp, zero1, zero2, zero3)}) == 1


def test_largest_batch_fits_and_the_next_does_not():
    assert largest_batch(lambda b: b <= 37) == 37
    assert largest_batch(lambda b: False) == 0
    cfg = tiny()
    plan = make_plan(cfg, PlanOptions(gpu_memory_gib=0.01))
    counts = count_parameters(cfg.model)
    for s, row in enumerate(plan["memory"]["strategies"]):
        b = row["largest_batch"]
        assert b > 0
        assert memory_estimate(s, counts, cfg.model, b, 32, 1, 1, 2).total <= 0.01 * 2**30
        assert memory_estimate(s, counts, cfg.model, b + 1, 32, 1, 1, 2).total > 0.01 * 2**30
        assert row["largest_batch_checkpointed"] > b


def test_json_and_table_output(capsys):
    from minipretrain.cli import main

    argv = ["plan", "--config", "configs/tiny.toml", "--devices", "4", "--budget-flops", "1e18",
            "--gpu-memory-gib", "80", "--pipeline-stages", "2", "--microbatches", "6", "--tokens-per-s", "1e5"]
    main([*argv, "--json"])
    plan = json.loads(capsys.readouterr().out)
    assert {"model", "flops", "batch", "chinchilla", "budget", "memory", "pipeline", "time"} <= set(plan)
    assert plan["batch"]["tokens_per_step"] == 16 * 4 * 256
    assert plan["time"]["run_s"] == pytest.approx(600 * 16 * 4 * 256 / 1e5)
    main(argv)
    text = capsys.readouterr().out
    for heading in ("parameters", "compute", "compute budget", "memory per device", "pipeline", "time"):
        assert f"\n{heading}" in "\n" + text
    assert "fsdp (ZeRO-3)" in text and "2,361,024" in text  # the tiny preset's parameter count


def test_refusals(capsys, tmp_path):
    base = ["plan", "--config", "configs/tiny.toml"]
    assert_cli_errors({
        "--devices must be at least 1": [*base, "--devices", "0"],
        "--budget-flops must be a positive number": [*base, "--budget-flops=-1e20"],
        "--gpu-hours must be a positive number": [*base, "--gpu-hours", "0", "--gpu", "H100"],
        "--mfu must be in (0, 1]": [*base, "--mfu", "1.5"],
        "--gpu B200: unknown GPU": [*base, "--gpu", "B200"],
        "--gpu-hours needs the GPU's peak": [*base, "--gpu-hours", "10"],
        "--budget-flops and --gpu-hours exclude each other": [*base, "--budget-flops", "1e20", "--gpu-hours", "1",
                                                               "--gpu", "H100"],
        "--data: data file": [*base, "--data", str(tmp_path / "missing.jsonl")],
        "--data: data glob": [*base, "--data", str(tmp_path / "*.jsonl")],
        "--data builtin:wiki: unknown built-in corpus": [*base, "--data", "builtin:wiki"],
        "--pipeline-stages and --microbatches go together": [*base, "--pipeline-stages", "4"],
        "--microbatches must be at least 1": [*base, "--pipeline-stages", "4", "--microbatches", "0"],
        "--gpu-memory-gib must be a positive number": [*base, "--gpu-memory-gib", "nan"],
        "--tokens-per-s and --measure exclude each other": [*base, "--tokens-per-s", "100", "--measure"],
        "--measure-steps must be at least 1": [*base, "--measure", "--measure-steps", "0"],
        "config file": ["plan", "--config", str(tmp_path / "none.toml")],
        "unknown key train.batch": [*base, "--set", "train.batch=3"],
    }, capsys)


def test_corpus_tokens_exact_and_extrapolated(shakespeare, tokenizer_dir, tmp_path):
    from minipretrain.data.sources import iter_documents
    from minipretrain.tokenizer import Tokenizer

    cfg = tiny(f"data.tokenizer={json.dumps(str(tokenizer_dir))}")
    tokenizer = Tokenizer.load(tokenizer_dir)
    exact = sum(len(ids) + 1 for ids in tokenizer.encode_batch(list(iter_documents(str(shakespeare)))))
    whole = corpus_tokens(str(shakespeare), cfg, 10**9)
    assert whole.exact and whole.tokens == exact
    # A 20 KB sample of a JSONL whose text is all \u escapes: the sample's text share of the file converts bytes.
    text = shared_file("zh-novel-xiyouji.txt").read_text(encoding="utf-8")[:60_000]
    jsonl = tmp_path / "zh.jsonl"
    jsonl.write_text("".join(json.dumps({"text": text[i:i + 600]}) + "\n" for i in range(0, len(text), 600)))
    truth = sum(len(ids) + 1 for ids in tokenizer.encode_batch(list(iter_documents(str(jsonl)))))
    sampled = corpus_tokens(str(jsonl), cfg, 20_000)
    assert not sampled.exact and sampled.sample_bytes < 30_000
    assert sampled.tokens == pytest.approx(truth, rel=0.05)


# The estimate counts every tensor autograd and the optimizer keep (docs/planning.md): on the tiny preset it lands
# within 0.5% of the measured peak in every variant tried (dense, MoE, QK-norm; bf16 and float32; accumulation). 5%
# leaves room for kernels that save a little more or less in another torch or on another CPU, and still fails when
# a large term is missing (here one float32 vocab-wide tensor is 7% of the peak, the bf16 weight copies 8%); the
# smaller ones are pinned by the hand counts above.
MEMORY_TOLERANCE = 0.05


@pytest.mark.parametrize("dtype, optimizer", [("float32", "adamw"), ("bfloat16", "adamw"), ("bfloat16", "muon")])
def test_memory_estimate_matches_measured_peak(dtype, optimizer):
    cfg = load_config("configs/tiny.toml", ["train.batch_size=2", "train.seq_len=128", "train.device=cpu",
                                            f"train.dtype={dtype}", f"optim.name={optimizer}"])
    measured = measure(cfg, steps=1)
    counts = count_parameters(cfg.model)
    estimate = memory_estimate(0, counts, cfg.model, 2, 128, 1, 1, act_bytes=4 if dtype == "float32" else 2,
                               muon=optimizer == "muon")
    assert measured["peak_memory_bytes"] > 20 * 2**20  # activations dominate, not fixed overheads
    assert estimate.total == pytest.approx(measured["peak_memory_bytes"], rel=MEMORY_TOLERANCE)
    assert measured["tokens_per_s"] > 0 and measured["dtype"] == dtype


@pytest.mark.slow
def test_measure_from_the_cli(capsys):
    from minipretrain.cli import main

    main(["plan", "--config", "configs/tiny.toml", "--set", "train.device=cpu", "--set", "train.batch_size=2",
          "--set", "train.seq_len=64", "--measure", "--measure-steps", "1", "--json"])
    plan = json.loads(capsys.readouterr().out)
    measured = plan["measured"]
    assert measured["estimate_over_measured"] == pytest.approx(1, rel=MEMORY_TOLERANCE)
    print(f"measured {measured['peak_memory_bytes']:,} B, estimated {measured['estimated_peak_bytes']:,.0f} B")
    assert plan["time"]["source"].startswith("measured") and measured["peak_rss_bytes"] > measured["peak_memory_bytes"]
    if not torch.cuda.is_available():
        assert measured["device"] == "cpu"


def test_epochs_size_the_run_from_the_corpus(shakespeare, tokenizer_dir):
    cfg = tiny(f"data.tokenizer={json.dumps(str(tokenizer_dir))}", "train.epochs=2")
    plan = make_plan(cfg, PlanOptions(data=str(shakespeare)))
    tokens, step_tokens = plan["corpus"]["tokens"], plan["batch"]["tokens_per_step"]
    assert plan["batch"]["max_steps"] == math.ceil(2 * tokens / step_tokens) and plan["batch"]["epochs"] == 2
    assert plan["corpus"]["run_epochs"] == pytest.approx(2, rel=0.01)
    with pytest.raises(UserError, match=r"train\.epochs sets the run's length from the data: pass --data"):
        make_plan(cfg, PlanOptions())
