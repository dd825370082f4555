"""Precision on CPU (bf16 autocast) and the CUDA-readiness fixes whose logic a CPU can check."""

import json
import os

import pytest
import torch
from conftest import BF16_TOLERANCE, assert_cli_errors, data_overrides, step_losses, tiny_config, tiny_model_config

from minipretrain import precision as precision_module
from minipretrain.errors import ConfigError
from minipretrain.model import MiniMind
from minipretrain.precision import configure_device, load_scaler_state, resolve_precision
from minipretrain.train import checkpoint as ckpt_io
from minipretrain.train.loop import train

CPU = torch.device("cpu")




def test_auto_dtype_on_cpu_follows_native_bf16(monkeypatch):
    monkeypatch.setattr(precision_module, "native_cpu_bf16", lambda: "AVX512-BF16")
    chosen = resolve_precision("auto", CPU)
    assert chosen.dtype == torch.bfloat16 and "native bf16 (AVX512-BF16)" in chosen.reason
    monkeypatch.setattr(precision_module, "native_cpu_bf16", lambda: None)
    chosen = resolve_precision("auto", CPU)
    assert chosen.dtype == torch.float32 and "no native bf16" in chosen.reason
    assert "emulated" in resolve_precision("bfloat16", CPU).reason  # allowed, but the start-up line says so
    assert resolve_precision("auto", torch.device("mps")).dtype == torch.float32
    # explicit choices
    assert resolve_precision("bfloat16", CPU).dtype == torch.bfloat16  # allowed even without native support
    assert resolve_precision("float32", CPU).dtype == torch.float32
    with pytest.raises(ConfigError, match=r"^train.dtype=float16 needs a CUDA device .*use bfloat16 or float32$"):
        resolve_precision("float16", CPU)
    with pytest.raises(ConfigError, match=r"^--dtype=bfloat16 runs on CUDA or CPU, not mps"):
        resolve_precision("bfloat16", torch.device("mps"), key="--dtype")
    if not torch.cuda.is_available():
        from minipretrain.parallel import resolve_device

        assert resolve_device("auto").type in ("cpu", "mps")
        with pytest.raises(ConfigError, match=r"^--device=cuda: CUDA is not available"):
            resolve_device("cuda", key="--device")


def test_native_bf16_detection_agrees_with_torch():
    found = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
    expected = ("AMX-BF16" if found.get("amx_bf16") else "AVX512-BF16" if found.get("avx512_bf16") else None)
    assert precision_module.native_cpu_bf16() == expected


def test_start_up_line_names_the_dtype_and_why(tmp_path, shakespeare, tokenizer_dir, capsys):
    train(tiny_config(*data_overrides(shakespeare, tokenizer_dir), "train.max_steps=1", "train.dtype=bfloat16"),
          tmp_path / "run", show_progress=False)
    assert "parameters on cpu (bfloat16; train.dtype=bfloat16)" in capsys.readouterr().out


def test_refused_dtype_leaves_an_existing_run_alone(tmp_path, shakespeare, tokenizer_dir):
    cfg = tiny_config(*data_overrides(shakespeare, tokenizer_dir), "train.max_steps=2")
    train(cfg, tmp_path / "run", show_progress=False)
    before = (tmp_path / "run" / "latest").read_text()
    cfg.train.dtype = "float16"
    with pytest.raises(ConfigError, match=r"train.dtype=float16 needs a CUDA device"):
        train(cfg, tmp_path / "run", overwrite=True, show_progress=False)
    assert (tmp_path / "run" / "latest").read_text() == before  # refused before --overwrite deleted anything
    ckpt_io.verify_checkpoint(ckpt_io.resolve_checkpoint(tmp_path / "run"))


@pytest.mark.parametrize("layout", ["packed", "padded", "document_mask"])
def test_bf16_training_lowers_the_loss_and_stays_near_float32(tmp_path, shakespeare, tokenizer_dir, layout):
    options = {"packed": [], "padded": ["data.layout=padded"], "document_mask": ["data.document_mask=true"]}[layout]
    common = [*data_overrides(shakespeare, tokenizer_dir), *options, "train.max_steps=30", "train.eval_every=0",
              "data.val_fraction=0.05", "train.eval_batches=4"]
    runs = {dtype: train(tiny_config(*common, f"train.dtype={dtype}"), tmp_path / dtype, show_progress=False)
            for dtype in ("float32", "bfloat16")}
    bf16 = runs["bfloat16"]
    assert bf16["final_val_loss"] < bf16["first_val_loss"] - 0.5
    assert bf16["final_val_loss"] == pytest.approx(runs["float32"]["final_val_loss"], abs=BF16_TOLERANCE)
    fp32_losses, bf16_losses = step_losses(tmp_path / "float32"), step_losses(tmp_path / "bfloat16")
    for step in range(1, 11):
        assert bf16_losses[step] == pytest.approx(fp32_losses[step], abs=BF16_TOLERANCE), step
    assert bf16_losses != fp32_losses  # autocast really ran in bf16
    assert (tmp_path / "bfloat16" / "samples.txt").read_text().strip()


def test_eval_and_generate_run_under_the_requested_autocast(tmp_path, shakespeare, tokenizer_dir, capsys):
    from minipretrain.cli import main

    config = tiny_config(*data_overrides(shakespeare, tokenizer_dir), "train.max_steps=4")
    train(config, tmp_path / "run", show_progress=False)
    run = str(tmp_path / "run")
    results = {}
    for dtype in ("float32", "bfloat16"):
        capsys.readouterr()
        main(["eval", "--ckpt", run, "--data", str(shakespeare), "--json", "--device", "cpu", "--dtype", dtype])
        results[dtype] = json.loads(capsys.readouterr().out)["loss"]
    assert results["bfloat16"] != results["float32"]  # bf16 autocast applied...
    assert results["bfloat16"] == pytest.approx(results["float32"], abs=BF16_TOLERANCE)  # ...and close
    main(["generate", "--ckpt", run, "--prompt", "ROMEO:", "--max-new-tokens", "8", "--device", "cpu",
          "--dtype", "bfloat16"])
    assert capsys.readouterr().out.startswith("ROMEO:")
    for command in (["eval", "--data", str(shakespeare)], ["generate"]):
        assert_cli_errors({"--dtype=float16 needs a CUDA device":
                           [*command, "--ckpt", run, "--device", "cpu", "--dtype", "float16"]}, capsys)


def test_rope_keeps_bf16_queries_and_keys_in_bf16():
    from minipretrain.model import apply_rope, rope_tables

    cos, sin = rope_tables(16, 8, 1e6)
    x = torch.randn(2, 4, 8, 16)
    rotated = apply_rope(x.bfloat16(), cos, sin)
    assert rotated.dtype == torch.bfloat16  # float32 tables would have promoted it
    torch.testing.assert_close(rotated.float(), apply_rope(x, cos, sin), atol=0.05, rtol=0.02)
    # under autocast, the whole attention layer's q/k/v stay bf16 into SDPA
    seen = {}
    real_sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, **kwargs):
        seen.update(dtypes={q.dtype, k.dtype, v.dtype})
        return real_sdpa(q, k, v, **kwargs)

    model = MiniMind(tiny_model_config(qk_norm=True))
    with pytest.MonkeyPatch.context() as mp, torch.autocast("cpu", dtype=torch.bfloat16):
        mp.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
        model(torch.randint(0, 320, (2, 16)))
    assert seen["dtypes"] == {torch.bfloat16}


def test_grouped_query_attention_shares_kv_heads_without_repeating_them(monkeypatch):
    torch.manual_seed(0)
    model = MiniMind(tiny_model_config()).eval()  # 4 heads, 2 kv heads
    ids = torch.randint(0, 320, (2, 24))
    calls = []
    real_sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kwargs):
        calls.append((q.size(1), k.size(1), attn_mask is not None, kwargs.get("enable_gqa", False)))
        return real_sdpa(q, k, v, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    with torch.no_grad():
        shared = model(ids).logits  # no mask: kv heads shared in place
        repeated = model(ids, doc_ids=torch.zeros_like(ids)).logits  # one document: dense mask, kv repeated
    assert calls[0] == (4, 2, False, True) and calls[-1] == (4, 4, True, False)
    torch.testing.assert_close(shared, repeated, atol=1e-5, rtol=1e-4)  # the same attention either way


@pytest.mark.slow
def test_compiled_block_mask_equals_the_eager_one():
    flex = pytest.importorskip("torch.nn.attention.flex_attention")
    from minipretrain.model import compiled, document_mask_mod, document_runs

    doc_ids = torch.tensor([[0] * 50 + [1] * 30 + [2] * 48, [5] * 100 + [6] * 28])
    run, _ = document_runs(doc_ids)
    build = compiled(flex.create_block_mask)
    assert compiled(flex.create_block_mask) is build  # compiled once per process
    for row_shift in (0, 17):  # a second call with new document boundaries reuses the compiled graph
        shifted = run.roll(row_shift, dims=1)
        mask = build(document_mask_mod(shifted), 2, None, 128, 128, device="cpu")
        eager = flex.create_block_mask(document_mask_mod(shifted), 2, None, 128, 128, device="cpu")
        assert torch.equal(mask.to_dense(), eager.to_dense())
        assert torch.equal(mask.kv_num_blocks, eager.kv_num_blocks) and torch.equal(mask.kv_indices, eager.kv_indices)


def test_generate_computes_on_the_given_device_not_the_first_parameters():
    from minipretrain.generate import generate

    torch.manual_seed(0)
    model = MiniMind(tiny_model_config()).eval()
    expected = generate(model, [5, 6, 7], 6, temperature=0)
    # As under FSDP's CPU offload: the first parameter lives elsewhere than the compute device.
    model.parameters = lambda recurse=True: iter([torch.empty(1, device="meta"), *MiniMind.parameters(model)])
    with pytest.raises((RuntimeError, NotImplementedError)):
        generate(model, [5, 6, 7], 6, temperature=0)  # the old default would build its inputs on "meta"
    assert generate(model, [5, 6, 7], 6, temperature=0, device="cpu") == expected


def test_final_checkpoint_is_saved_before_the_final_sample(tmp_path, shakespeare, tokenizer_dir, monkeypatch):
    from minipretrain.train import loop

    def broken_sample(*args, **kwargs):
        raise RuntimeError("out of memory while sampling")

    monkeypatch.setattr(loop, "complete", broken_sample)
    with pytest.raises(RuntimeError, match="sampling"):
        train(tiny_config(*data_overrides(shakespeare, tokenizer_dir)), tmp_path / "run", show_progress=False)
    ckpt = ckpt_io.resolve_checkpoint(tmp_path / "run")
    assert ckpt.name == "step_000006"
    ckpt_io.verify_checkpoint(ckpt)


def test_fp16_resume_accepts_a_checkpoint_saved_without_loss_scaling():
    unscaled = torch.amp.GradScaler("cpu", enabled=False).state_dict()  # what a bf16 or fp32 run saves
    assert unscaled == {}
    scaler = torch.amp.GradScaler("cpu", enabled=True, init_scale=2.0**12)
    with pytest.raises(RuntimeError, match="empty"):
        scaler.load_state_dict(unscaled)  # why the helper exists
    load_scaler_state(scaler, unscaled)
    assert scaler.get_scale() == 2.0**12  # a fresh scale
    saved = torch.amp.GradScaler("cpu", enabled=True, init_scale=8.0).state_dict()
    load_scaler_state(scaler, saved)
    assert scaler.get_scale() == 8.0


def test_rng_state_holds_the_training_gpu_only_when_training_on_cuda(monkeypatch):
    asked = []

    def get_rng_state(device="cuda"):
        asked.append(torch.device(device))
        return torch.zeros(4, dtype=torch.uint8)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU machine...
    monkeypatch.setattr(torch.cuda, "get_rng_state", get_rng_state)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device="cuda": asked.append(("set", device)))
    state = ckpt_io.capture_rng(CPU)  # ...training on the CPU: no CUDA context opened
    assert state["cuda"] is None and asked == []
    ckpt_io.restore_rng({**state, "cuda": torch.zeros(4, dtype=torch.uint8)}, CPU)  # saved on a GPU, resumed on CPU
    assert asked == []
    gpu1 = torch.device("cuda", 1)
    state = ckpt_io.capture_rng(gpu1)
    assert asked == [gpu1] and state["cuda"] is not None  # the training GPU's generator, not the current one's
    ckpt_io.restore_rng(state, gpu1)
    assert asked[-1] == ("set", gpu1)


def test_gpu_peaks_for_mfu():
    from minipretrain.train.metrics import gpu_peak_tflops

    assert gpu_peak_tflops("NVIDIA H100 80GB HBM3", torch.bfloat16) == 989.0
    assert gpu_peak_tflops("NVIDIA H100 80GB HBM3", torch.float32) == 494.5  # TF32
    assert gpu_peak_tflops("NVIDIA H100 NVL", torch.bfloat16) == 835.0
    assert gpu_peak_tflops("NVIDIA H200 NVL", torch.float16) == 835.0
    assert gpu_peak_tflops("NVIDIA H200", torch.bfloat16) == 989.0
    assert gpu_peak_tflops("NVIDIA H100 PCIe", torch.float32) == 378.0
    assert gpu_peak_tflops("NVIDIA A100-SXM4-80GB", torch.bfloat16) == 312.0
    assert gpu_peak_tflops("NVIDIA GeForce GTX 1080", torch.bfloat16) is None


def test_process_group_backend_adds_gloo_for_cpu_offload():
    from minipretrain.parallel import process_group_backend

    cuda, cpu = torch.device("cuda", 0), CPU
    assert process_group_backend(tiny_config().parallel, cuda) == "nccl"
    assert process_group_backend(tiny_config().parallel, cpu) == "gloo"
    offload = tiny_config("parallel.mode=fsdp", "parallel.cpu_offload=true").parallel
    assert process_group_backend(offload, cuda) == "cuda:nccl,cpu:gloo"  # CPU gradients' norm goes over gloo
    assert process_group_backend(tiny_config("parallel.backend=gloo").parallel, cuda) == "gloo"


def test_one_gpu_cpu_offload_joins_a_one_process_group(monkeypatch):
    """The CUDA calls are recorded, not made: what the one-process FSDP offload path asks torch for."""
    import torch.distributed as dist
    import torch.distributed.device_mesh as device_mesh

    from minipretrain.parallel import init_distributed

    calls = {}
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.update(set_device=device))
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kwargs: calls.update(backend=backend, **kwargs))
    monkeypatch.setattr(dist, "new_group", lambda backend: calls.update(host_group=backend) or "gloo group")

    class Mesh:
        def __getitem__(self, name):
            return self

        def get_local_rank(self):
            return 0

    monkeypatch.setattr(device_mesh, "init_device_mesh",
                        lambda kind, shape, mesh_dim_names: calls.update(mesh=(kind, shape)) or Mesh())
    world = init_distributed(tiny_config("parallel.mode=fsdp", "parallel.cpu_offload=true").parallel, "cuda")
    assert calls["set_device"] == torch.device("cuda", 0)  # an indexed device: set_device refuses a bare "cuda"
    assert calls["device_id"] == torch.device("cuda", 0)
    assert calls["backend"] == "cuda:nccl,cpu:gloo" and calls["world_size"] == 1 and calls["rank"] == 0
    assert isinstance(calls["store"], dist.HashStore)  # no rendezvous for one process
    assert calls["mesh"] == ("cuda", (1, 1, 1))  # ("pp", "dp", "tp")
    assert calls["host_group"] == "gloo" and world.host_group == "gloo group"  # flags never wait for the GPU
    assert world.distributed and world.size == 1 and world.device == torch.device("cuda", 0)
    # without offload a single process joins nothing, and closing it leaves any group it did not create alone
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "destroy_process_group", lambda: calls.update(destroyed=True))
    plain = init_distributed(tiny_config().parallel, "cpu")
    assert not plain.distributed
    plain.close()
    assert "destroyed" not in calls
    world.close()
    assert calls["destroyed"]


def test_configure_device_switches(monkeypatch):
    before = torch.get_float32_matmul_precision()
    try:
        configure_device(torch.device("cuda"))  # the flag is process-wide and settable without a GPU
        assert torch.get_float32_matmul_precision() == "high"  # TF32 for float32 matmuls
    finally:
        torch.set_float32_matmul_precision(before)
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    try:
        configure_device(CPU, deterministic=True)
        assert torch.are_deterministic_algorithms_enabled()
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    finally:
        torch.use_deterministic_algorithms(False)
