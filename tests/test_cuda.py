"""The GPU path. Each test body runs on the CPU in every run and again on CUDA where a GPU is present (its `cuda`
parameter); tests that only mean something on a GPU are marked `cuda` whole. On a GPU machine:

    PYTHONPATH=src python3 -m pytest tests -m cuda        # only the CUDA runs
"""

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from conftest import (
    BF16_TOLERANCE,
    DEVICES,
    data_overrides,
    load_benchmark,
    step_losses,
    tiny_config,
    tiny_model_config,
)

from minipretrain.data.batches import Batch
from minipretrain.generate import generate
from minipretrain.model import KVCache, MiniMind
from minipretrain.parallel import World
from minipretrain.train import checkpoint as ckpt_io
from minipretrain.train.loop import train
from minipretrain.train.metrics import gpu_peak_tflops
from minipretrain.train.optim import build_optimizer
from minipretrain.train.step import accumulate_gradients, apply_gradients

REPO = Path(__file__).resolve().parents[1]
# Heads 16 wide: FlexAttention's GPU kernels need at least that (tiny_config's heads are 8 wide).
WIDE_HEADS = "model.hidden_size=64"
FLEX_EAGER_WARNING = "ignore:flex_attention called without torch.compile"




@pytest.fixture
def full_fp32():
    """float32 matmuls in full precision (training on CUDA turns TF32 on for the whole process)."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(before)


def _packed_rows(device):
    """Two rows of 128 tokens, each several documents long."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 320, (2, 128), generator=gen)
    doc_ids = torch.stack([torch.repeat_interleave(torch.arange(4), torch.tensor([40, 3, 61, 24])),
                           torch.repeat_interleave(torch.arange(3), torch.tensor([100, 1, 27]))])
    return ids.to(device), doc_ids.to(device)


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
def test_compiled_bf16_training_with_document_masks_learns_and_matches_eager(tmp_path, shakespeare, tokenizer_dir,
                                                                             device):
    common = [*data_overrides(shakespeare, tokenizer_dir), WIDE_HEADS, f"train.device={device}", "train.dtype=bfloat16",
              "data.document_mask=true", "train.max_steps=20", "train.eval_every=0", "data.val_fraction=0.05",
              "train.eval_batches=4"]
    eager = train(tiny_config(*common), tmp_path / "eager", show_progress=False)
    compiled = train(tiny_config(*common, "train.compile=true"), tmp_path / "compiled", show_progress=False)
    assert compiled["final_val_loss"] < compiled["first_val_loss"] - 0.5
    assert compiled["final_val_loss"] == pytest.approx(eager["final_val_loss"], abs=BF16_TOLERANCE)
    eager_losses, compiled_losses = step_losses(tmp_path / "eager"), step_losses(tmp_path / "compiled")
    assert eager_losses.keys() == compiled_losses.keys() == set(range(1, 21))
    for step in eager_losses:
        assert compiled_losses[step] == pytest.approx(eager_losses[step], abs=BF16_TOLERANCE), step


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("optimizer_name", ["adamw", "muon"])
def test_grad_scaler_skips_an_overflow_step_and_halves_the_scale(device, optimizer_name):
    torch.manual_seed(0)
    model = MiniMind(tiny_model_config()).to(device)
    optimizer = build_optimizer(model, tiny_config(f"optim.name={optimizer_name}").optim, device)
    scaler = torch.amp.GradScaler(device, init_scale=2.0**10)
    # fp16 autocast where the trainer allows it (CUDA); the scaler's logic is the same on the CPU
    autocast = (torch.autocast(device, dtype=torch.float16) if device == "cuda"
                else torch.autocast(device, enabled=False))
    ids = torch.randint(0, 320, (4, 32))
    batch, world = Batch(ids, ids.clone()), World(device=torch.device(device))

    accumulate_gradients(model, [batch], autocast, scaler, world)
    before = [p.detach().clone() for p in model.parameters()]
    model.layers[0].mlp.up_proj.weight.grad[0, 0] = float("inf")  # one gradient overflowed
    grad_norm = apply_gradients(model, optimizer, scaler, grad_clip=1.0)
    assert not math.isfinite(grad_norm)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))  # the update was skipped...
    assert scaler.get_scale() == 2.0**9  # ...and the scale halved

    accumulate_gradients(model, [batch], autocast, scaler, world)
    assert math.isfinite(apply_gradients(model, optimizer, scaler, grad_clip=1.0))
    assert not torch.equal(before[0], next(model.parameters()))  # a finite step updates again
    assert scaler.get_scale() == 2.0**9  # and keeps the scale (it grows only after growth_interval good steps)


@pytest.mark.cuda
def test_fp16_training_with_loss_scaling_lowers_the_loss(tmp_path, shakespeare, tokenizer_dir):
    summary = train(tiny_config(*data_overrides(shakespeare, tokenizer_dir), "train.device=cuda", "train.dtype=float16",
                                "train.max_steps=30", "data.val_fraction=0.05", "train.eval_batches=4"),
                    tmp_path / "run", show_progress=False)
    assert summary["final_val_loss"] < summary["first_val_loss"] - 0.5
    state = ckpt_io.load_train_state(ckpt_io.resolve_checkpoint(tmp_path / "run"))
    assert state["scaler"]["scale"] > 0  # the scaler's state is saved for an exact resume


@pytest.mark.parametrize("device", DEVICES)
def test_fused_adamw_is_used_and_matches_foreach(device, full_fp32):
    torch.manual_seed(0)
    model = MiniMind(tiny_model_config()).to(device)
    reference = copy.deepcopy(model)
    cfg = tiny_config().optim
    fused = build_optimizer(model, cfg, device)
    assert fused.defaults["fused"] is True
    groups = [{"params": g["params"], "weight_decay": g["weight_decay"]}
              for g in build_optimizer(reference, cfg, device).param_groups]
    foreach = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, foreach=True)
    ids = torch.randint(0, 320, (4, 32), device=device)
    for _ in range(3):
        for m, optimizer in ((model, fused), (reference, foreach)):
            m(ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    for a, b in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


@pytest.mark.filterwarnings(FLEX_EAGER_WARNING)
@pytest.mark.parametrize("device", DEVICES)
def test_flex_attention_matches_the_sdpa_reference(device, full_fp32):
    """Forward everywhere; backward on CUDA (FlexAttention has no backward on the CPU)."""
    pytest.importorskip("torch.nn.attention.flex_attention")
    torch.manual_seed(0)
    model = MiniMind(tiny_model_config(hidden_size=64)).to(device)
    ids, doc_ids = _packed_rows(device)
    logits, grads = {}, {}
    for backend in ("sdpa", "flex"):
        model.attn_backend = backend
        model.zero_grad()
        with torch.set_grad_enabled(device == "cuda"):
            out = model(ids, labels=ids, doc_ids=doc_ids)
            if device == "cuda":
                out.loss.backward()
                grads[backend] = [p.grad.clone() for p in model.parameters()]
        logits[backend] = out.logits.detach()
    torch.testing.assert_close(logits["flex"], logits["sdpa"], atol=1e-4, rtol=1e-4)
    for flex_grad, sdpa_grad in zip(grads.get("flex", []), grads.get("sdpa", []), strict=True):
        torch.testing.assert_close(flex_grad, sdpa_grad, atol=1e-4, rtol=1e-3)
    if device == "cuda":
        model.attn_backend = None
        assert model.attention_backend_for(device) == "flex"  # what training picks on a GPU


@pytest.mark.parametrize("device", DEVICES)
def test_kv_cache_generation_matches_recomputing_the_prefix(device, full_fp32):
    torch.manual_seed(0)
    model = MiniMind(tiny_model_config()).to(device).eval()
    prompt = [5, 17, 42, 7]
    cached = generate(model, prompt, 24, temperature=0, device=device)
    assert cached == generate(model, prompt, 24, temperature=0, use_cache=False, device=device)
    # under bf16 autocast (what generate and eval use on GPUs) the cached logits match the full forward's
    ids = torch.randint(0, 320, (2, 24), device=device)
    with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16):
        full = model(ids).logits.float()
        cache = KVCache()
        model(ids[:, :16], cache=cache)
        steps = torch.cat([model(ids[:, i : i + 1], cache=cache).logits.float() for i in range(16, 24)], dim=1)
    torch.testing.assert_close(steps, full[:, 16:], atol=2e-2, rtol=2e-2)


@pytest.mark.cuda
def test_checkpoint_saved_on_cuda_resumes_on_cpu_and_back(tmp_path, shakespeare, tokenizer_dir):
    common = [*data_overrides(shakespeare, tokenizer_dir), "train.dtype=bfloat16", "model.dropout=0.1",
              "train.save_every=2"]
    run = tmp_path / "run"
    train(tiny_config(*common, "train.device=cuda", "train.max_steps=4"), run, show_progress=False)
    saved = ckpt_io.resolve_checkpoint(run)
    on_gpu = ckpt_io.load_model_from_checkpoint(saved, "cuda")[0].state_dict()
    on_cpu = ckpt_io.load_model_from_checkpoint(saved, "cpu")[0].state_dict()
    assert all(torch.equal(on_gpu[k].cpu(), on_cpu[k]) for k in on_gpu)
    train(tiny_config(*common, "train.device=cpu", "train.max_steps=6"), run, resume=True, show_progress=False)
    train(tiny_config(*common, "train.device=cuda", "train.max_steps=8"), run, resume=True, show_progress=False)
    losses = step_losses(run)
    assert sorted(losses) == list(range(1, 9)) and all(math.isfinite(v) for v in losses.values())
    assert losses[8] < losses[1]


@pytest.mark.parametrize("device", DEVICES)
def test_resume_is_exact_with_deterministic_kernels(tmp_path, shakespeare, tokenizer_dir, device):
    common = [*data_overrides(shakespeare, tokenizer_dir), f"train.device={device}", "train.dtype=bfloat16",
              "train.deterministic=true", "model.dropout=0.1", "train.max_steps=8", "train.save_every=4"]
    try:
        train(tiny_config(*common), tmp_path / "reference", show_progress=False)
        assert torch.are_deterministic_algorithms_enabled()  # the setting reached torch
        halfway = tmp_path / "reference" / "checkpoints" / "step_000004"
        train(tiny_config(*common), tmp_path / "resumed", resume=str(halfway), show_progress=False)
    finally:
        torch.use_deterministic_algorithms(False)
    reference, resumed = step_losses(tmp_path / "reference"), step_losses(tmp_path / "resumed")
    assert sorted(resumed) == [5, 6, 7, 8]
    assert resumed == {step: reference[step] for step in resumed}  # bitwise, dropout masks included


@pytest.mark.cuda
def test_fsdp_cpu_offload_trains_on_one_gpu(tmp_path, shakespeare, tokenizer_dir):
    common = [*data_overrides(shakespeare, tokenizer_dir), "train.device=cuda", "train.dtype=bfloat16",
              "train.max_steps=6", "train.save_every=3"]
    train(tiny_config(*common), tmp_path / "plain", show_progress=False)
    try:
        train(tiny_config(*common, "parallel.mode=fsdp", "parallel.cpu_offload=true"), tmp_path / "offload",
              show_progress=False)
    finally:
        if torch.distributed.is_initialized():  # train() leaves the group only when it succeeds
            torch.distributed.destroy_process_group()
    plain, offload = step_losses(tmp_path / "plain"), step_losses(tmp_path / "offload")
    for step in range(1, 7):
        assert offload[step] == pytest.approx(plain[step], abs=BF16_TOLERANCE), step
    ckpt = ckpt_io.resolve_checkpoint(tmp_path / "offload")
    assert (ckpt / "dcp").is_dir() and (ckpt / "rng_00000.pt").is_file()
    model = ckpt_io.load_model_from_checkpoint(ckpt, "cuda")[0]  # gathered from the sharded checkpoint
    assert next(model.parameters()).is_cuda


@pytest.mark.cuda
def test_a_training_step_never_synchronises_with_the_host(tmp_path, shakespeare, tokenizer_dir, monkeypatch):
    """Every piece of a training step runs under torch.cuda.set_sync_debug_mode("error"): a host synchronisation
    inside a step (an .item(), a bool of a device tensor, a pageable copy) raises. Reading back at log lines,
    validation and saves happen outside the step and may synchronise. (On CPU: tests/test_step_loop.py counts.)"""
    from minipretrain import moe
    from minipretrain.parallel.mesh import World as MeshWorld
    from minipretrain.train import loop, stability

    def strict(fn):
        def run(*args, **kwargs):
            torch.cuda.set_sync_debug_mode("error")
            try:
                return fn(*args, **kwargs)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return run

    for name in ("accumulate_gradients", "unscale_and_clip", "finish_step"):
        monkeypatch.setattr(loop, name, strict(getattr(loop, name)))
    for cls, name in ((stability.SpikeGuard, "check"), (stability.SpikeGuard, "update"),
                      (MeshWorld, "max_over_ranks_")):
        monkeypatch.setattr(cls, name, strict(getattr(cls, name)))
    monkeypatch.setattr(moe, "end_of_step", strict(moe.end_of_step))
    for extra in ((), ("data.document_mask=true", WIDE_HEADS, "train.compile=true")):
        cfg = tiny_config(*data_overrides(shakespeare, tokenizer_dir), "train.device=cuda", "train.dtype=bfloat16",
                          "train.max_steps=6", "train.log_every=3", "train.grad_accum=2", *extra)
        assert train(cfg, tmp_path / f"run{len(extra)}", show_progress=False)["steps"] == 6


@pytest.mark.parametrize("device", DEVICES)
def test_throughput_benchmark_reports_mfu(tmp_path, device, capsys):
    throughput = load_benchmark("throughput")
    args = ["--config", str(REPO / "configs" / "tiny.toml"), "--device", device, "--steps", "2", "--warmup", "1",
            "--batch-size", "2", "--seq-len", "64", "--json", str(tmp_path / "throughput.json")]
    in_table = device == "cuda" and gpu_peak_tflops(torch.cuda.get_device_name(), torch.bfloat16) is not None
    if not in_table:
        args += ["--peak-tflops", "1.0"]
    result = throughput.main(args)
    out = capsys.readouterr().out
    assert "| MFU |" in out and "tokens/s" in out
    run = result["runs"][0]
    assert run["tokens_per_s"] > 0 and 0 < run["mfu"] < 1
    assert ("from the table" in run["peak_source"]) == in_table
    assert json.loads((tmp_path / "throughput.json").read_text())["runs"][0]["mfu"] == run["mfu"]
    if device == "cuda":
        assert result["peak_memory_bytes"]["reserved"] >= result["peak_memory_bytes"]["allocated"] > 0
