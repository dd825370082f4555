"""optim.name=muon: Muon for the blocks' matrices, AdamW for the rest (train/optim.py)."""

import pytest
import torch
from conftest import data_overrides, step_losses, tiny_config, tiny_model_config
from test_distributed import _config, _steps, torchrun

from minipretrain.errors import CheckpointError, ConfigError
from minipretrain.model import MiniMind
from minipretrain.train.loop import train
from minipretrain.train.optim import Optimizers, build_optimizer, is_muon_parameter, optimizer_list, set_learning_rate

MUON = "optim.name=muon"


def test_parameters_are_routed_as_listed():
    for moe in (False, True):
        model = MiniMind(tiny_model_config(moe=moe, num_shared_experts=1))
        muon = sorted(name for name, p in model.named_parameters() if is_muon_parameter(name, p))
        adamw = sorted(name for name, p in model.named_parameters() if not is_muon_parameter(name, p))
        leaves = {name.split(".")[-2] for name in muon}
        assert leaves == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
        assert "embed_tokens.weight" in adamw and "norm.weight" in adamw  # the tied head is the embedding
        assert all("layernorm" in n or n in ("embed_tokens.weight", "norm.weight") or n.endswith("mlp.gate.weight")
                   for n in adamw), adamw
        assert any("experts" in n for n in muon) == moe and any(n.endswith("mlp.gate.weight") for n in adamw) == moe
    optimizer = build_optimizer(model, tiny_config(MUON).optim, "cpu")
    muon_opt, adamw_opt = optimizer_list(optimizer)
    assert isinstance(optimizer, Optimizers) and isinstance(muon_opt, torch.optim.Muon)
    assert sum(len(g["params"]) for g in muon_opt.param_groups) == len(muon)
    assert {id(p) for g in muon_opt.param_groups for p in g["params"]}.isdisjoint(
        {id(p) for g in adamw_opt.param_groups for p in g["params"]})


def test_a_muon_update_is_nearly_orthogonal():
    """Newton-Schulz turns the (momentum) gradient into a near-orthogonal update: its singular values sit near 1
    (between about 0.7 and 1.2 with torch's quintic coefficients) where the gradient's spread over a factor 100.
    (Directions much weaker than that are lifted less in 5 iterations: Muon's known approximation.)"""
    torch.manual_seed(0)
    model = MiniMind(tiny_model_config())
    cfg = tiny_config(MUON, "optim.muon_weight_decay=0", "optim.muon_adjust_lr=original").optim
    optimizer = build_optimizer(model, cfg, "cpu")
    weight = model.layers[0].mlp.up_proj.weight  # (width, hidden): Keller's scale is sqrt(max(1, rows / cols))
    u, _, v = torch.linalg.svd(torch.randn(weight.shape), full_matrices=False)
    grad = u @ torch.diag(torch.logspace(-1, 1, min(weight.shape))) @ v  # singular values over 2 decades
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    weight.grad = grad.clone()
    before = weight.detach().clone()
    set_learning_rate(optimizer, 0.01, cfg)
    optimizer.step()
    scale = 0.01 * max(1.0, weight.shape[0] / weight.shape[1]) ** 0.5
    singular = torch.linalg.svdvals((before - weight.detach()) / scale)
    assert singular.min() > 0.6 and singular.max() < 1.3, singular
    assert torch.linalg.svdvals(grad).max() / torch.linalg.svdvals(grad).min() > 50  # the input was not


def test_one_schedule_drives_both_learning_rates():
    model = MiniMind(tiny_model_config())
    cfg = tiny_config(MUON, "optim.muon_lr=0.02", "optim.lr=1e-3").optim
    optimizer = build_optimizer(model, cfg, "cpu")
    set_learning_rate(optimizer, 5e-4, cfg)  # half the peak, e.g. mid-decay
    muon_opt, adamw_opt = optimizer_list(optimizer)
    assert [g["lr"] for g in muon_opt.param_groups] == [pytest.approx(0.01)]
    assert {g["lr"] for g in adamw_opt.param_groups} == {5e-4}


def test_muon_learns_and_resumes_exactly(tmp_path, shakespeare, tokenizer_dir):
    common = (*data_overrides(shakespeare, tokenizer_dir), MUON, "train.max_steps=8", "train.save_every=4",
              "model.dropout=0.1", "train.grad_accum=2")
    whole = train(tiny_config(*common), tmp_path / "whole", show_progress=False)
    assert whole["final_train_loss"] < step_losses(tmp_path / "whole")[1]
    train(tiny_config(*common), tmp_path / "resumed", resume=str(tmp_path / "whole" / "checkpoints" / "step_000004"),
          show_progress=False)
    resumed, uninterrupted = step_losses(tmp_path / "resumed"), step_losses(tmp_path / "whole")
    assert resumed == {step: uninterrupted[step] for step in range(5, 9)}  # both optimizers' states restored


def test_a_skipped_step_leaves_muon_untouched(tmp_path, shakespeare, tokenizer_dir, monkeypatch):
    from test_stability import Faults

    faults = Faults(monkeypatch, {5: "nan"})
    train(tiny_config(*data_overrides(shakespeare, tokenizer_dir), MUON, "train.max_steps=7"), tmp_path / "run",
          show_progress=False)
    before, after = faults.weights_at_start[5], faults.weights_at_start[6]
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, shakespeare, tokenizer_dir):
    tmp = tmp_path_factory.mktemp("muon_one")
    cfg, _ = _config(tmp, shakespeare, tokenizer_dir, MUON)
    train(cfg, tmp / "run", show_progress=False)
    return tmp / "run"


@pytest.mark.parametrize("layout", [("train.batch_size=2", "parallel.mode=ddp"),
                                    ("train.batch_size=2", "parallel.mode=fsdp"),
                                    ("parallel.tensor_parallel=2",)], ids=["ddp", "fsdp", "tp"])
def test_muon_on_two_ranks_equals_one_process(tmp_path, shakespeare, tokenizer_dir, one_process, layout):
    """DDP replicas step on whole matrices; under FSDP2 and tensor parallelism the matrices are sharded DTensors, and
    Newton-Schulz's matmuls and norms on them are whole-matrix math (DTensor gathers what it needs), so the update
    is the unsharded one, and each rank keeps its shard. (Newton-Schulz runs in bf16: agreement within 1e-4.)"""
    _, config = _config(tmp_path, shakespeare, tokenizer_dir, MUON, *layout)
    torchrun(2, "train", "--config", str(config), "--run-dir", str(tmp_path / "run"), "--no-progress")
    two, one = _steps(tmp_path / "run"), _steps(one_process)
    for step in range(1, 7):
        assert two[step]["loss"] == pytest.approx(one[step]["loss"], abs=1e-4), step
        assert two[step]["tokens"] == one[step]["tokens"]


@pytest.mark.parametrize("overrides, message", [
    (("optim.muon_lr=-1",), "optim.muon_lr: must be positive"),
    (("optim.muon_momentum=1",), r"optim\.muon_momentum: must be in \[0, 1\)"),
    (("optim.muon_adjust_lr=keller",), "optim.muon_adjust_lr: unknown adjustment"),
    (("optim.muon_weight_decay=-1",), "optim.muon_weight_decay: must be >= 0"),
])
def test_impossible_muon_settings_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        tiny_config(MUON, *overrides)
    with pytest.raises(ConfigError, match=r"optim\.name: unknown optimizer 'sgd'"):
        tiny_config("optim.name=sgd")


def test_resuming_with_the_other_optimizer_is_refused(tmp_path, shakespeare, tokenizer_dir):
    common = (*data_overrides(shakespeare, tokenizer_dir), "train.max_steps=2")
    train(tiny_config(*common), tmp_path / "run", show_progress=False)
    with pytest.raises(CheckpointError, match=r"trained with adamw; resume with --set optim\.name=adamw"):
        train(tiny_config(*common, MUON, "train.max_steps=4"), tmp_path / "run", resume=True, show_progress=False)


def test_weight_decay_is_routed_per_optimizer():
    model = MiniMind(tiny_model_config())
    cfg = tiny_config(MUON, "optim.weight_decay=0.1", "optim.muon_weight_decay=0.02").optim
    muon_opt, adamw_opt = optimizer_list(build_optimizer(model, cfg, "cpu"))
    assert [g["weight_decay"] for g in muon_opt.param_groups] == [0.02]
    assert [g["weight_decay"] for g in adamw_opt.param_groups] == [0.0]  # embedding and norms: never decayed
    unset = tiny_config(MUON, "optim.weight_decay=0.1").optim
    assert [g["weight_decay"] for g in optimizer_list(build_optimizer(model, unset, "cpu"))[0].param_groups] == [0.1]


def test_a_resume_or_branch_takes_the_new_settings_not_the_saved_ones(tmp_path, shakespeare, tokenizer_dir):
    """The optimizer state comes from the checkpoint; its hyper-parameters from this run's config."""
    from minipretrain.train import checkpoint as ckpt_io

    common = (*data_overrides(shakespeare, tokenizer_dir), MUON, "train.max_steps=2", "train.save_every=2")
    train(tiny_config(*common), tmp_path / "run", show_progress=False)
    cfg = tiny_config(*common, "optim.muon_momentum=0.5", "optim.muon_weight_decay=0.03", "optim.beta2=0.9")
    model = MiniMind(cfg.model)
    optimizer = build_optimizer(model, cfg.optim, "cpu")
    ckpt_io.load_weights_and_optimizer(tmp_path / "run" / "checkpoints" / "step_000002", model, optimizer)
    muon_opt, adamw_opt = optimizer_list(optimizer)
    assert [(g["momentum"], g["weight_decay"]) for g in muon_opt.param_groups] == [(0.5, 0.03)]
    assert {g["betas"] for g in adamw_opt.param_groups} == {(0.9, 0.9)}
    assert all(muon_opt.state[p]["momentum_buffer"].abs().sum() > 0 for g in muon_opt.param_groups
               for p in g["params"])  # the saved state did load
