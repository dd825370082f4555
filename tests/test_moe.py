"""Mixture of experts: the layer against references, the balancing mechanisms, and training with everything else
(resume, generation, eval, DDP / FSDP / tensor parallelism)."""

import copy
import json

import pytest
import torch
from conftest import DEVICES, assert_cli_errors, step_losses, tiny_config, tiny_model_config

from minipretrain.errors import ConfigError
from minipretrain.model import FeedForward, MiniMind
from minipretrain.moe import MoEFeedForward, balancing_loss, end_of_step, expert_balance
from minipretrain.parallel import World
from minipretrain.train.checkpoint import load_model_from_checkpoint
from minipretrain.train.loop import train
from minipretrain.train.metrics import read_metrics
from minipretrain.train.step import accumulate_gradients

MOE = ["model.moe=true", "model.num_experts=4", "model.num_experts_per_tok=2", "model.num_shared_experts=1"]


def _layer(**overrides) -> MoEFeedForward:
    cfg = tiny_model_config(moe=True, **overrides)
    torch.manual_seed(0)
    return MoEFeedForward(cfg, make_expert=lambda width: FeedForward(cfg.hidden_size, width))


def test_one_expert_top1_no_shared_equals_the_dense_swiglu():
    layer = _layer(num_experts=1, num_experts_per_tok=1, num_shared_experts=0)
    dense = FeedForward(32, layer.experts[0].gate_proj.out_features)
    dense.load_state_dict(layer.experts[0].state_dict())
    x = torch.randn(3, 7, 32)
    assert torch.equal(layer(x), dense(x))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("top_k, shared, norm", [(1, 0, True), (1, 0, False), (2, 1, True), (3, 0, False)])
def test_dispatch_equals_a_naive_per_token_reference(top_k, shared, norm, device):
    layer = _layer(num_experts=4, num_experts_per_tok=top_k, num_shared_experts=shared, norm_topk_prob=norm).to(device)
    x = torch.randn(2, 9, 32, device=device)
    flat = x.reshape(-1, 32)
    expected = torch.zeros_like(flat)
    scores = layer.gate(flat).float().softmax(-1)
    for t in range(flat.size(0)):  # the definition, one token at a time
        weights, chosen = scores[t].topk(top_k)
        if norm:
            weights = weights / weights.sum()
        for w, e in zip(weights, chosen, strict=True):
            expected[t] += w * layer.experts[int(e)](flat[t : t + 1])[0]
        for expert in layer.shared_experts:
            expected[t] += expert(flat[t : t + 1])[0]
    torch.testing.assert_close(layer(x).reshape(-1, 32), expected, atol=1e-6, rtol=1e-5)


def test_an_expert_without_tokens_still_joins_backward():
    layer = _layer(num_experts=4, num_experts_per_tok=1, num_shared_experts=0)
    with torch.no_grad():
        layer.gate.weight.zero_()
        layer.gate.weight[0] = 10.0  # positive inputs: every token goes to expert 0
    layer(torch.rand(2, 5, 32)).sum().backward()
    for e, expert in enumerate(layer.experts):
        for p in expert.parameters():
            assert p.grad is not None  # DDP / FSDP need every parameter in the graph
            assert (p.grad.abs().sum() > 0) == (e == 0)


def test_balancing_loss_is_at_its_minimum_for_a_uniform_router():
    tokens, experts = 64, 4
    uniform = torch.full((tokens, experts), 1 / experts)
    balanced = torch.arange(tokens * 2).remainder(experts).view(tokens, 2)  # every expert equally loaded
    for per_sequence in (False, True):
        assert balancing_loss(uniform, balanced, 4, per_sequence).item() == pytest.approx(1.0)
        torch.manual_seed(0)
        for _ in range(20):  # routers skewed toward some experts: loss above the minimum
            logits = torch.randn(tokens, experts) + torch.tensor([3.0, 1.0, 0.0, 0.0]) * torch.rand(1) * 3
            scores = logits.softmax(-1)
            chosen = scores.topk(2).indices
            assert balancing_loss(scores, chosen, 4, per_sequence).item() > 1.0
    collapsed = torch.tensor([[1.0, 0.0, 0.0, 0.0]]).repeat(tokens, 1)
    assert balancing_loss(collapsed, torch.zeros(tokens, 1, dtype=torch.long), 4, False).item() == pytest.approx(4.0)


def test_expert_balance_metric():
    assert float(expert_balance(torch.tensor([[5, 5, 5, 5]]))) == pytest.approx(1.0)
    assert float(expert_balance(torch.tensor([[20, 0, 0, 0], [10, 10, 0, 0]]))) == pytest.approx((4.0 + 2.0) / 2)


def test_bias_update_moves_load_toward_balance_on_a_skewed_router():
    layer = _layer(num_experts=4, num_experts_per_tok=1, num_shared_experts=0, router_bias_update_rate=0.01)
    x = torch.randn(4, 64, 32)
    with torch.no_grad():
        layer.gate.weight.normal_(0, 0.3)
        layer.gate.weight[0] += 0.4 * x.mean(dim=(0, 1)).sign()  # expert 0 wins too many tokens
    model = torch.nn.Sequential(layer)
    balances = []
    for _ in range(60):
        with torch.no_grad():
            out = layer(x)
        balances.append(float(end_of_step(model, World(), 0.01)))
    assert balances[0] > 1.4  # skewed at the start
    assert max(balances[-10:]) < 1.1  # the bias has evened it out
    assert layer.expert_bias[0] < 0 < layer.expert_bias[1:].min()  # the busy expert pushed down, idle ones up
    layer.expert_bias.zero_()
    assert not torch.equal(out, layer(x))  # the bias changed which experts were picked


def test_gradient_accumulation_with_the_balancing_loss_equals_one_big_batch():
    """seq_aux makes the balancing loss a mean over sequences: 2 micro-batches of 2 rows give the gradient of one
    batch of 4."""
    from minipretrain.data.batches import Batch
    from minipretrain.precision import mixed_precision

    torch.manual_seed(0)
    model = MiniMind(tiny_model_config(moe=True, num_experts=4, num_experts_per_tok=2, router_aux_loss_coef=0.5))
    x = torch.randint(0, 320, (4, 16))
    autocast, scaler = mixed_precision(torch.device("cpu"), torch.float32)
    grads = []
    for micro in ([Batch(x, x)], [Batch(x[:2], x[:2]), Batch(x[2:], x[2:])]):
        model.zero_grad()
        loss, aux = accumulate_gradients(model, micro, autocast, scaler)
        grads.append((float(loss), float(aux), [p.grad.clone() for p in model.parameters()]))
    assert grads[0][1] > 0.5  # coef 0.5 times a loss >= ~1 per layer
    assert grads[0][0] == pytest.approx(grads[1][0], abs=1e-6) and grads[0][1] == pytest.approx(grads[1][1], abs=1e-6)
    for a, b in zip(grads[0][2], grads[1][2], strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


def test_parameter_counts_of_the_presets():
    from minipretrain.config import load_config

    counts = {}
    for name in ("tiny", "tiny-moe", "minimind2-moe", "minimind3-moe"):
        with torch.device("meta"):
            model = MiniMind(load_config(f"configs/{name}.toml").model)
        counts[name] = (model.num_parameters() / 1e6, model.num_active_parameters() / 1e6)
    assert counts["tiny-moe"][1] == pytest.approx(counts["tiny"][0], rel=0.01)  # same active size as the demo
    assert counts["minimind2-moe"][0] == pytest.approx(145, rel=0.02)
    assert counts["minimind3-moe"] == pytest.approx((198, 64), rel=0.02)


def test_moe_config_errors():
    for bad, message in [("model.num_experts=0", "model.num_experts: must be at least 1"),
                         ("model.num_experts_per_tok=5",
                          "model.num_experts_per_tok: must be in [1, model.num_experts=4]"),
                         ("model.num_shared_experts=-1", "model.num_shared_experts: must be >= 0"),
                         ("model.moe_intermediate_size=0", "model.moe_intermediate_size: must be positive"),
                         ("model.router_aux_loss_coef=-0.1", "model.router_aux_loss_coef: must be >= 0"),
                         ("model.router_bias_update_rate=-1", "model.router_bias_update_rate: must be >= 0"),
                         ("model.moe=1", "model.moe: expected bool")]:
        with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
            tiny_config("model.moe=true", bad)
    with pytest.raises(ConfigError,
                       match=r"model.moe_intermediate_size: 63 is not divisible by parallel.tensor_parallel=2"):
        tiny_config("model.moe=true", "model.moe_intermediate_size=63", "parallel.tensor_parallel=2")


@pytest.fixture(scope="module")
def moe_run(tmp_path_factory, shakespeare, tokenizer_dir):
    """A tiny MoE with a shared expert and bias balancing: 6 steps, checkpoints at 3 and 6."""
    tmp = tmp_path_factory.mktemp("moe")
    cfg = tiny_config(f"data.path={json.dumps(str(shakespeare))}", f"data.tokenizer={json.dumps(str(tokenizer_dir))}",
                      *MOE, "model.router_bias_update_rate=0.05", "train.save_every=3", "train.eval_every=3",
                      "train.grad_accum=2")
    summary = train(cfg, tmp / "run", show_progress=False)
    return cfg, tmp / "run", summary


def test_training_logs_aux_loss_and_balance(moe_run, capsys):
    _cfg, run, summary = moe_run
    records = [r for r in read_metrics(run / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in records] == list(range(1, 7))
    for r in records:
        assert 0 < r["aux_loss"] < 4 * 2 * 0.01 + 1e-9  # coef 0.01 x 2 layers x at most 4 experts
        assert 1.0 <= r["expert_balance"] <= 4.0
    assert summary["final_val_loss"] < summary["first_val_loss"]


def test_kill_and_resume_continues_routing_exactly(tmp_path, moe_run):
    cfg, run, _ = moe_run
    resumed = tmp_path / "resumed"
    train(cfg, resumed, resume=str(run / "checkpoints" / "step_000003"), show_progress=False)
    assert step_losses(resumed) == {s: loss for s, loss in step_losses(run).items() if s > 3}
    at_resume, _, _, _ = load_model_from_checkpoint(run / "checkpoints" / "step_000003", "cpu")
    assert at_resume.layers[0].mlp.expert_bias.abs().min() > 0  # the biases had moved, and were saved
    a, _, _, _ = load_model_from_checkpoint(run, "cpu")
    b, _, _, _ = load_model_from_checkpoint(resumed, "cpu")
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(x, y), name


def test_generation_with_the_kv_cache_and_eval(moe_run, shakespeare, capsys):
    from minipretrain.cli import main
    from minipretrain.generate import generate

    model, tokenizer, _, _ = load_model_from_checkpoint(moe_run[1], "cpu")
    prompt = tokenizer.encode("ROMEO:")
    cached = generate(model, prompt, 12, temperature=0, use_cache=True)
    assert cached == generate(model, prompt, 12, temperature=0, use_cache=False)
    main(["eval", "--ckpt", str(moe_run[1]), "--data", str(shakespeare), "--device", "cpu", "--dtype", "float32",
          "--json"])
    result = json.loads(capsys.readouterr().out)
    assert 0 < result["loss"] < 6


def test_startup_line_shows_active_parameters(tmp_path, shakespeare, tokenizer_dir, capsys):
    cfg = tiny_config(f"data.path={json.dumps(str(shakespeare))}", f"data.tokenizer={json.dumps(str(tokenizer_dir))}",
                      *MOE, "train.max_steps=1")
    train(cfg, tmp_path / "run", show_progress=False)
    out = capsys.readouterr()
    assert "M parameters (" in out.out + out.err and "M active per token)" in out.out + out.err


def test_moe_flag_errors_in_the_cli(tmp_path, capsys):
    assert_cli_errors({"model.num_experts_per_tok: must be in [1, model.num_experts=2]":
                       ["train", "--run-dir", str(tmp_path / "r"), "--set", "model.moe=true",
                        "--set", "model.num_experts=2", "--set", "model.num_experts_per_tok=3"]}, capsys)
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("layout", [["parallel.mode=fsdp", "train.batch_size=2"],
                                    ["parallel.mode=ddp", "train.batch_size=2"],
                                    ["parallel.tensor_parallel=2"]], ids=["fsdp", "ddp", "tensor_parallel"])
def test_two_ranks_equal_one_process(tmp_path, moe_run, layout):
    from test_distributed import _assert_same_steps, _steps, torchrun

    cfg, single, _ = moe_run
    cfg = copy.deepcopy(cfg)
    for override in layout:
        section, _, rest = override.partition(".")
        key, _, value = rest.partition("=")
        setattr(getattr(cfg, section), key, int(value) if value.isdigit() else value)
    config = tmp_path / "config.toml"
    config.write_text(cfg.to_toml())
    torchrun(2, "train", "--config", str(config), "--run-dir", str(tmp_path / "run"), "--no-progress")
    ranks, reference = _steps(tmp_path / "run"), _steps(single)
    _assert_same_steps(ranks, reference, range(1, 7))
    for step in range(1, 7):  # routing and the bias updates followed the same global counts
        assert ranks[step]["expert_balance"] == pytest.approx(reference[step]["expert_balance"], abs=1e-4)
        assert ranks[step]["aux_loss"] == pytest.approx(reference[step]["aux_loss"], abs=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_routing_is_deterministic_under_deterministic_algorithms(device):
    """Dispatch and the balancing loss use no scatter-add: two forward + backward passes give bitwise-equal
    gradients, and none of their kernels is refused in deterministic mode."""
    layer = _layer(num_experts=4, num_experts_per_tok=2, num_shared_experts=1).to(device)
    x = torch.randn(4, 64, 32, device=device)
    grads = []
    torch.use_deterministic_algorithms(True)
    try:
        for _ in range(2):
            layer.zero_grad(set_to_none=True)
            (layer(x).square().mean() + layer.aux_loss).backward()
            grads.append([p.grad.clone() for p in layer.parameters()])
    finally:
        torch.use_deterministic_algorithms(False)
    for a, b in zip(*grads, strict=True):
        assert torch.equal(a, b)
