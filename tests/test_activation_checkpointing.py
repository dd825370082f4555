"""train.activation_checkpointing: recomputing blocks in backward changes memory, never the numbers or checkpoints."""

import copy
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import step_losses, tiny_config, tiny_model_config

from minipretrain.cli import main
from minipretrain.config import load_config
from minipretrain.errors import ConfigError
from minipretrain.model import KVCache, MiniMind
from minipretrain.parallel import apply_activation_checkpointing, checkpointed_blocks
from minipretrain.train import checkpoint as ckpt_io
from minipretrain.train.loop import train

MODES = ["full", "selective"]


def test_which_blocks_each_mode_recomputes():
    assert checkpointed_blocks(4, "none") == []
    assert checkpointed_blocks(4, "full") == [0, 1, 2, 3]
    assert checkpointed_blocks(5, "selective") == [1, 3]
    assert checkpointed_blocks(1, "selective") == []


def _forward_backward(model, inputs, seed=0):
    """Outputs, gradients, the number of tensors autograd kept outside recomputed blocks, and the next random
    numbers (the RNG state a step leaves behind)."""
    torch.manual_seed(seed)
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(1) or t, lambda t: t):
        out = model(inputs, labels=inputs)
    loss = out.loss if out.aux_loss is None else out.loss + out.aux_loss
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    return out, grads, len(kept), torch.rand(4)


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
@pytest.mark.parametrize("mode", MODES)
def test_losses_and_gradients_equal_no_checkpointing(mode, moe):
    torch.manual_seed(0)
    reference = MiniMind(tiny_model_config(num_hidden_layers=4, dropout=0.2, moe=moe)).train()
    model = copy.deepcopy(reference)
    apply_activation_checkpointing(model, mode)
    inputs = torch.randint(0, 320, (3, 24))
    out_ref, grads_ref, kept_ref, rng_ref = _forward_backward(reference, inputs)
    out, grads, kept, rng = _forward_backward(model, inputs)  # dropout > 0: the recompute replays its masks
    assert kept < kept_ref  # activations of the recomputed blocks were not kept
    torch.testing.assert_close(out.loss, out_ref.loss, rtol=0, atol=1e-6)
    if moe:
        torch.testing.assert_close(out.aux_loss, out_ref.aux_loss, rtol=0, atol=1e-6)
        for a, b in zip(reference.layers, model.layers, strict=True):  # the recompute does not count tokens twice
            assert torch.equal(a.mlp.routed_tokens, b.mlp.routed_tokens)
    assert grads.keys() == grads_ref.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, grads_ref[name], rtol=1e-5, atol=1e-7, msg=name)
    assert torch.equal(rng, rng_ref)  # the replay leaves the RNG where training left it


def test_fewer_activations_kept_in_full_than_selective():
    torch.manual_seed(0)
    base = MiniMind(tiny_model_config(num_hidden_layers=4))
    inputs = torch.randint(0, 320, (2, 16))
    kept = {}
    for mode in ("none", "selective", "full"):
        model = copy.deepcopy(base)
        apply_activation_checkpointing(model, mode)
        kept[mode] = _forward_backward(model, inputs)[2]
    assert kept["full"] < kept["selective"] < kept["none"]


def test_names_copies_evaluation_and_generation_are_unchanged():
    torch.manual_seed(0)
    reference = MiniMind(tiny_model_config(num_hidden_layers=2, dropout=0.1))
    model = copy.deepcopy(reference)
    apply_activation_checkpointing(model, "full")
    assert list(model.state_dict()) == list(reference.state_dict())  # checkpoints keep their keys
    clone = copy.deepcopy(model)  # the copy's blocks run the copy's weights, not the original's
    with torch.no_grad():
        clone.layers[0].mlp.down_proj.weight.zero_()
    inputs = torch.randint(0, 320, (2, 10))
    reference.eval(), model.eval(), clone.eval()
    with torch.no_grad():
        assert not torch.equal(clone(inputs).logits, model(inputs).logits)
        torch.testing.assert_close(model(inputs).logits, reference(inputs).logits)
        caches = KVCache(), KVCache()  # a cache is filled once per layer, not again by a recompute
        for m, cache in zip((reference, model), caches, strict=True):
            m(inputs, cache=cache)
            m(inputs[:, :1], cache=cache)
        assert caches[0].length == caches[1].length == 11


def test_unknown_mode_is_refused_by_the_config():
    with pytest.raises(ConfigError, match=r"train.activation_checkpointing: unknown mode 'some' "
                                          r"\(none, selective or full\)"):
        load_config(None, ["train.activation_checkpointing=some"])
    assert load_config(None, ["train.activation_checkpointing=selective"]).train.activation_checkpointing == "selective"


def _config(shakespeare, tokenizer_dir, mode, *overrides):
    return tiny_config(f"data.path={json.dumps(str(shakespeare))}", f"data.tokenizer={json.dumps(str(tokenizer_dir))}",
                       "model.dropout=0.1", "model.num_hidden_layers=3", "train.max_steps=4", "train.save_every=2",
                       "data.val_fraction=0", f"train.activation_checkpointing={mode}", *overrides)


def test_training_runs_and_checkpoints_are_the_same_in_every_mode(tmp_path, shakespeare, tokenizer_dir):
    for mode in ("none", *MODES):
        train(_config(shakespeare, tokenizer_dir, mode), tmp_path / mode, show_progress=False)
    reference = step_losses(tmp_path / "none")
    assert reference.keys() == {1, 2, 3, 4}
    for mode in MODES:
        assert step_losses(tmp_path / mode) == pytest.approx(reference, abs=1e-5), mode
    # A checkpoint saved with recomputation resumes without it and vice versa, on the same losses.
    for saved, resumed in (("full", "none"), ("none", "selective")):
        run = tmp_path / f"{saved}_to_{resumed}"
        train(_config(shakespeare, tokenizer_dir, resumed), run, resume=str(tmp_path / saved / "checkpoints" /
                                                                             "step_000002"), show_progress=False)
        assert step_losses(run) == pytest.approx({3: reference[3], 4: reference[4]}, abs=1e-5), run.name
    weights = {mode: ckpt_io.load_model_from_checkpoint(tmp_path / mode)[0].state_dict() for mode in ("none", "full")}
    assert weights["none"].keys() == weights["full"].keys()
    for name, value in weights["none"].items():
        torch.testing.assert_close(weights["full"][name], value, rtol=1e-4, atol=1e-6, msg=name)


def test_fsdp_with_full_recomputation_equals_one_process(tmp_path, shakespeare, tokenizer_dir, capsys):
    """FSDP2 shards the recomputed blocks; its sharded checkpoint consolidates to the keys of a plain run."""
    train(_config(shakespeare, tokenizer_dir, "none", "model.dropout=0.0"), tmp_path / "single", show_progress=False)
    cfg = _config(shakespeare, tokenizer_dir, "full", "model.dropout=0.0", "train.batch_size=2", "parallel.mode=fsdp")
    (tmp_path / "fsdp.toml").write_text(cfg.to_toml())
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "minipretrain",
           "train", "--config", str(tmp_path / "fsdp.toml"), "--run-dir", str(tmp_path / "fsdp"), "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    assert step_losses(tmp_path / "fsdp") == pytest.approx(step_losses(tmp_path / "single"), abs=1e-5)
    main(["checkpoint", "consolidate", str(tmp_path / "fsdp"), "--out", str(tmp_path / "gathered")])
    gathered = ckpt_io.load_model_from_checkpoint(tmp_path / "gathered")[0].state_dict()
    single = ckpt_io.load_model_from_checkpoint(tmp_path / "single")[0].state_dict()
    assert gathered.keys() == single.keys()
    for name, value in single.items():
        torch.testing.assert_close(gathered[name], value, rtol=1e-4, atol=1e-6, msg=name)
