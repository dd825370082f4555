"""Distributed training on CPU: 2 processes under torchrun with the gloo backend, as a user launches them."""

import json
import os
import subprocess
import sys
import time

import pytest
import torch
from conftest import BF16_TOLERANCE, assert_cli_errors, tiny_config

from minipretrain.errors import CheckpointError, ConfigError
from minipretrain.train import checkpoint as ckpt_io
from minipretrain.train.loop import train
from minipretrain.train.metrics import read_metrics

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built")

TOLERANCE = 1e-5


def _config(tmp_path, shakespeare, tokenizer_dir, *overrides):
    cfg = tiny_config(f"data.path={json.dumps(str(shakespeare))}", f"data.tokenizer={json.dumps(str(tokenizer_dir))}",
                      "train.grad_accum=2", "train.save_every=3", "train.eval_every=3", *overrides)
    path = tmp_path / f"config_{len(list(tmp_path.glob('config_*')))}.toml"
    path.write_text(cfg.to_toml())
    return cfg, path


def torchrun(nproc: int, *args: str, script: list[str] = ("-m", "minipretrain"), timeout: float = 240,
             check: bool = True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           *script, *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if check:
        assert result.returncode == 0, result.stderr[-4000:]
    return result


def _steps(run) -> dict[int, dict]:
    return {r["step"]: r for r in read_metrics(run / "metrics.jsonl") if "loss" in r}


def _assert_same_steps(a: dict, b: dict, steps) -> None:
    for step in steps:
        assert abs(a[step]["loss"] - b[step]["loss"]) < TOLERANCE, (step, a[step]["loss"], b[step]["loss"])
        assert abs(a[step]["grad_norm"] - b[step]["grad_norm"]) < 1e-4 * max(1.0, a[step]["grad_norm"]), step
        assert a[step]["tokens"] == b[step]["tokens"], step


@pytest.fixture(scope="module")
def single_run(tmp_path_factory, shakespeare, tokenizer_dir):
    """The reference: one process, batch 4 x 2 micro-steps, 6 steps, checkpoints at 3 and 6."""
    tmp = tmp_path_factory.mktemp("single")
    cfg, _ = _config(tmp, shakespeare, tokenizer_dir)
    train(cfg, tmp / "run", show_progress=False)
    return tmp / "run"


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory, shakespeare, tokenizer_dir):
    """Two FSDP2 ranks with batch 2 each: the same global batch as the reference."""
    tmp = tmp_path_factory.mktemp("fsdp")
    _, config = _config(tmp, shakespeare, tokenizer_dir, "train.batch_size=2", "parallel.mode=fsdp")
    torchrun(2, "train", "--config", str(config), "--run-dir", str(tmp / "run"), "--no-progress")
    return tmp / "run"


def test_ddp_two_ranks_equal_one_process(tmp_path, shakespeare, tokenizer_dir, single_run):
    _, config = _config(tmp_path, shakespeare, tokenizer_dir, "train.batch_size=2", "parallel.mode=ddp")
    result = torchrun(2, "train", "--config", str(config), "--run-dir", str(tmp_path / "run"), "--no-progress")
    ddp, single = _steps(tmp_path / "run"), _steps(single_run)
    _assert_same_steps(ddp, single, range(1, 7))
    assert ddp[6]["tokens"] == 6 * 2 * 2 * 32 * 2  # global: steps x ranks x batch x seq x grad_accum
    # rank 0 alone logs: each line once
    assert result.stderr.count("done: 6 steps") + result.stdout.count("done: 6 steps") == 1
    assert "ddp data parallel x 2" in result.stderr + result.stdout
    val = [r["val_loss"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "val_loss" in r]
    ref = [r["val_loss"] for r in read_metrics(single_run / "metrics.jsonl") if "val_loss" in r]
    assert val == pytest.approx(ref, abs=TOLERANCE)


def test_two_nodes_over_c10d_rendezvous_equal_one_process(tmp_path, shakespeare, tokenizer_dir, single_run):
    """Two torchrun "nodes" (one process each, here on one machine) joined by the c10d rendezvous, as on a cluster."""
    import socket

    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    _, config = _config(tmp_path, shakespeare, tokenizer_dir, "train.batch_size=2")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1", "--rdzv_backend=c10d",
           f"--rdzv_endpoint=localhost:{port}", "--rdzv_id=test", "-m", "minipretrain", "train", "--config",
           str(config), "--run-dir", str(tmp_path / "run"), "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    nodes = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
             for _ in range(2)]
    outputs = [node.communicate(timeout=240)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs
    _assert_same_steps(_steps(tmp_path / "run"), _steps(single_run), range(1, 7))


def test_fsdp_equals_one_process_and_shards_its_checkpoint(fsdp_run, single_run):
    _assert_same_steps(_steps(fsdp_run), _steps(single_run), range(1, 7))
    ckpt = fsdp_run / "checkpoints" / "step_000006"
    shards = sorted(p.name for p in (ckpt / "dcp").glob("*.distcp"))
    assert shards == ["__0_0.distcp", "__1_0.distcp"]  # each rank wrote its own shard
    assert not (ckpt / "model.safetensors").exists()  # no gather at save time
    assert sorted(p.name for p in ckpt.glob("rng_*.pt")) == ["rng_00000.pt", "rng_00001.pt"]


def test_tensor_parallel_equals_one_process(tmp_path, shakespeare, tokenizer_dir, single_run):
    # tensor parallel x 2 and no data parallelism: both ranks see the whole batch of 4
    _, config = _config(tmp_path, shakespeare, tokenizer_dir, "parallel.tensor_parallel=2")
    torchrun(2, "train", "--config", str(config), "--run-dir", str(tmp_path / "run"), "--no-progress")
    _assert_same_steps(_steps(tmp_path / "run"), _steps(single_run), range(1, 7))


def test_fsdp_with_tensor_parallel_2d_mesh_equals_one_process(tmp_path, shakespeare, tokenizer_dir, single_run):
    # 4 processes: 2 FSDP shards x 2 tensor-parallel ranks, batch 2 per data-parallel rank
    _, config = _config(tmp_path, shakespeare, tokenizer_dir, "train.batch_size=2", "parallel.mode=fsdp",
                        "parallel.tensor_parallel=2", "train.max_steps=6")
    result = torchrun(4, "train", "--config", str(config), "--run-dir", str(tmp_path / "run"), "--no-progress")
    assert "fsdp data parallel x 2, tensor parallel x 2" in result.stderr + result.stdout
    _assert_same_steps(_steps(tmp_path / "run"), _steps(single_run), range(1, 7))


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_bf16_on_two_ranks_stays_near_one_bf16_process(tmp_path, shakespeare, tokenizer_dir, mode):
    """bf16 autocast under DDP, and FSDP2's MixedPrecisionPolicy (bf16 compute from float32 master weights, float32
    gradient reduction), on gloo: close to one bf16 process (bf16 rounding differs with the batch split)."""
    cfg, _ = _config(tmp_path, shakespeare, tokenizer_dir, "train.dtype=bfloat16")
    train(cfg, tmp_path / "single", show_progress=False)
    _, config = _config(tmp_path, shakespeare, tokenizer_dir, "train.dtype=bfloat16", "train.batch_size=2",
                        f"parallel.mode={mode}")
    result = torchrun(2, "train", "--config", str(config), "--run-dir", str(tmp_path / "run"), "--no-progress")
    assert "(bfloat16; train.dtype=bfloat16)" in result.stderr + result.stdout
    two, one = _steps(tmp_path / "run"), _steps(tmp_path / "single")
    for step in range(1, 7):
        assert two[step]["loss"] == pytest.approx(one[step]["loss"], abs=BF16_TOLERANCE), step
        assert two[step]["tokens"] == one[step]["tokens"]
    assert two[6]["loss"] < two[1]["loss"]


def test_checkpoint_saved_on_two_ranks_resumes_on_one(tmp_path, fsdp_run, single_run, shakespeare, tokenizer_dir):
    cfg, _ = _config(tmp_path, shakespeare, tokenizer_dir)
    train(cfg, tmp_path / "run", resume=str(fsdp_run / "checkpoints" / "step_000003"), show_progress=False)
    resumed = _steps(tmp_path / "run")
    assert sorted(resumed) == [4, 5, 6]  # the samples it had not seen, no more
    _assert_same_steps(resumed, _steps(single_run), range(4, 7))


def test_checkpoint_saved_on_one_rank_resumes_on_two(tmp_path, single_run, shakespeare, tokenizer_dir):
    _, config = _config(tmp_path, shakespeare, tokenizer_dir, "train.batch_size=2", "parallel.mode=fsdp")
    torchrun(2, "train", "--config", str(config), "--run-dir", str(tmp_path / "run"), "--no-progress",
             "--resume", str(single_run / "checkpoints" / "step_000003"))
    _assert_same_steps(_steps(tmp_path / "run"), _steps(single_run), range(4, 7))


def test_consolidate_gathers_the_shards(tmp_path, fsdp_run, capsys):
    from minipretrain.cli import main

    ckpt = fsdp_run / "checkpoints" / "step_000006"
    from_shards, _, _, _ = ckpt_io.load_model_from_checkpoint(ckpt)  # read straight from dcp/
    main(["checkpoint", "consolidate", str(fsdp_run), "--out", str(tmp_path / "export")])
    assert "model.safetensors" in capsys.readouterr().out
    exported, _, _, _ = ckpt_io.load_model_from_checkpoint(tmp_path / "export")
    for (name, a), (_, b) in zip(from_shards.state_dict().items(), exported.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert sorted(p.name for p in (tmp_path / "export").iterdir()) == [
        "config.json", "config.toml", "meta.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    main(["generate", "--ckpt", str(tmp_path / "export"), "--max-new-tokens", "4", "--device", "cpu"])
    assert capsys.readouterr().out.strip()
    # in place: model.safetensors joins the checkpoint and its checksums
    import shutil

    shutil.copytree(ckpt, tmp_path / "ckpt")
    main(["checkpoint", "consolidate", str(tmp_path / "ckpt")])
    meta = ckpt_io.verify_checkpoint(tmp_path / "ckpt")
    assert "model.safetensors" in meta["files"] and "dcp/__1_0.distcp" in meta["files"]
    in_place, _, _, _ = ckpt_io.load_model_from_checkpoint(tmp_path / "ckpt")
    pairs = zip(in_place.state_dict().values(), exported.state_dict().values(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)
    assert_cli_errors({
        "is not empty": ["checkpoint", "consolidate", str(fsdp_run), "--out", str(tmp_path / "export")],
        "no checkpoint at": ["checkpoint", "consolidate", str(tmp_path / "missing")],
    }, capsys)


def test_export_hf_gathers_the_shards(tmp_path, fsdp_run, capsys):
    """A sharded (DCP) checkpoint exports to transformers like a single-process one: --verify loads the export and
    compares its logits with our model read from the shards."""
    pytest.importorskip("transformers")
    from minipretrain.cli import main

    main(["export", "hf", "--ckpt", str(fsdp_run), "--out", str(tmp_path / "hf"), "--verify"])
    assert "verified: transformers' logits equal minipretrain's" in capsys.readouterr().out


def test_checkpoint_metadata_cannot_run_code(tmp_path, single_run):
    import pickle
    import shutil

    ckpt = tmp_path / "ckpt"
    shutil.copytree(single_run / "checkpoints" / "step_000006", ckpt)
    (ckpt / "model.safetensors").unlink()

    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    (ckpt / "dcp" / ".metadata").write_bytes(pickle.dumps(Evil()))
    ckpt_io._write_meta(ckpt, 6, "x")  # even with matching checksums
    with pytest.raises(CheckpointError, match="not allowed in checkpoint metadata"):
        ckpt_io.load_model_from_checkpoint(ckpt)
    assert not (tmp_path / "pwned").exists()


FAILING_RANK = """
import os, signal, sys
from minipretrain.data import batches
from minipretrain.train import checkpoint

how = sys.argv[1]
if os.environ["RANK"] == "1" and how in ("raise", "kill"):
    next_batch, calls = batches.MixtureSampler.next_batch, []

    def failing(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 5:  # step 3, with two micro-batches per step
            if how == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            raise RuntimeError("injected failure on rank 1")
        return next_batch(self, *args, **kwargs)

    batches.MixtureSampler.next_batch = failing
if os.environ["RANK"] == "1" and how == "kill-in-save":
    save, saves = checkpoint.dcp.save, []

    def dying_save(*args, **kwargs):
        saves.append(1)
        if len(saves) == 2:  # the checkpoint of step 6, while rank 0 writes its shard
            os.kill(os.getpid(), signal.SIGKILL)
        return save(*args, **kwargs)

    checkpoint.dcp.save = dying_save

from minipretrain.cli import main
main(sys.argv[2:])
"""


@pytest.mark.parametrize("how", ["raise", "kill"])
def test_a_failing_rank_ends_the_job(tmp_path, shakespeare, tokenizer_dir, how):
    _, config = _config(tmp_path, shakespeare, tokenizer_dir, "train.batch_size=2", "train.max_steps=50")
    script = tmp_path / "failing.py"
    script.write_text(FAILING_RANK)
    start = time.monotonic()
    result = torchrun(2, how, "train", "--config", str(config), "--run-dir", str(tmp_path / "run"), "--no-progress",
                      script=[str(script)], timeout=180, check=False)
    assert result.returncode != 0
    assert time.monotonic() - start < 120  # no hung rank waiting for its peer
    if how == "raise":
        assert "injected failure on rank 1" in result.stderr
    assert not (tmp_path / "run" / "summary.json").exists()


def test_a_rank_killed_during_a_save_resumes_from_the_previous_checkpoint(tmp_path, shakespeare, tokenizer_dir,
                                                                          single_run):
    _, config = _config(tmp_path, shakespeare, tokenizer_dir, "train.batch_size=2", "parallel.mode=fsdp")
    script = tmp_path / "failing.py"
    script.write_text(FAILING_RANK)
    run = tmp_path / "run"
    result = torchrun(2, "kill-in-save", "train", "--config", str(config), "--run-dir", str(run), "--no-progress",
                      script=[str(script)], check=False)
    assert result.returncode != 0
    assert (run / "latest").read_text().strip() == "checkpoints/step_000003"  # the torn save is not pointed to
    torchrun(2, "train", "--run-dir", str(run), "--resume", "--no-progress")
    assert (run / "latest").read_text().strip() == "checkpoints/step_000006"
    assert not list((run / "checkpoints").glob(".tmp_*"))
    _assert_same_steps(_steps(run), _steps(single_run), range(1, 7))


def test_gradient_sync_and_clipping_in_one_process():
    from minipretrain.parallel import clip_grad_norm, gradient_sync

    class FakeDDP:
        def no_sync(self):
            return "no_sync"

    assert gradient_sync(FakeDDP(), last_micro_step=False) == "no_sync"  # accumulate locally...
    assert gradient_sync(FakeDDP(), last_micro_step=True) != "no_sync"  # ...all-reduce at the boundary
    torch.manual_seed(0)
    a, b = [torch.nn.Parameter(torch.randn(5, 3)) for _ in range(2)], [torch.nn.Parameter(torch.randn(5, 3))
                                                                        for _ in range(2)]
    for pa, pb in zip(a, b, strict=True):
        pa.grad = torch.randn(5, 3)
        pb.grad = pa.grad.clone()
        pb.data = pa.data.clone()
    ours = float(clip_grad_norm(a, 0.5))
    reference = torch.nn.utils.clip_grad_norm_(b, 0.5).item()
    assert ours == pytest.approx(reference, rel=1e-6)
    for pa, pb in zip(a, b, strict=True):
        assert torch.allclose(pa.grad, pb.grad, atol=1e-7)
    assert float(clip_grad_norm(a, 0.0)) == pytest.approx(0.5, rel=1e-5)  # 0: measure only, no clipping


def test_parallel_config_errors(monkeypatch):
    from minipretrain.parallel import World, fsdp_options, init_distributed

    with pytest.raises(ConfigError, match=r"parallel.mode"):
        tiny_config("parallel.mode=zero")
    with pytest.raises(ConfigError, match=r"parallel.backend"):
        tiny_config("parallel.backend=mpi")
    with pytest.raises(ConfigError, match=r"parallel.timeout_s"):
        tiny_config("parallel.timeout_s=0")
    with pytest.raises(ConfigError,
                       match=r"model.num_key_value_heads: 2 is not divisible by parallel.tensor_parallel=4"):
        tiny_config("parallel.tensor_parallel=4")
    with pytest.raises(ConfigError, match="needs that many processes"):
        init_distributed(tiny_config("parallel.tensor_parallel=2").parallel, "cpu")
    # under torchrun, layouts that cannot work are refused before the process group is joined
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ConfigError, match="tensor_parallel=2 does not divide the 3 processes"):
        init_distributed(tiny_config("parallel.tensor_parallel=2").parallel, "cpu")
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(ConfigError, match=r"parallel.mode=ddp cannot combine with tensor parallelism"):
        init_distributed(tiny_config("parallel.tensor_parallel=2", "parallel.mode=ddp").parallel, "cpu")
    assert not torch.distributed.is_initialized()
    from minipretrain.model import MiniMind
    from minipretrain.parallel import parallelize

    with pytest.raises(ConfigError, match=r"float16.*bfloat16"):  # fp16 needs a scaler FSDP does not use here
        parallelize(MiniMind(tiny_config().model), World(size=2, dp_size=2), tiny_config("parallel.mode=fsdp").parallel,
                    torch.float16)
    for size in ("1", "2"):  # one process offloading, or several: refused before any process group is joined
        monkeypatch.setenv("WORLD_SIZE", size)
        with pytest.raises(ConfigError, match=r"cpu_offload.*needs train.device=cuda"):
            init_distributed(tiny_config("parallel.mode=fsdp", "parallel.cpu_offload=true").parallel, "cpu")
        assert not torch.distributed.is_initialized()
    with pytest.raises(ConfigError, match=r"parallel.cpu_offload: offloads FSDP shards: it needs parallel.mode=fsdp"):
        tiny_config("parallel.cpu_offload=true")
    options = fsdp_options(tiny_config("parallel.reshard_after_forward=false").parallel, torch.bfloat16)
    assert options["reshard_after_forward"] is False  # ZeRO-2-like: parameters stay gathered until backward
    assert options["mp_policy"].param_dtype == torch.bfloat16 and options["mp_policy"].reduce_dtype == torch.float32
    assert World().is_main and not World().distributed


def test_async_save_on_two_ranks_equals_one_process(tmp_path, shakespeare, tokenizer_dir, single_run):
    """The background writes use a process group of their own, beside the training collectives."""
    _, config = _config(tmp_path, shakespeare, tokenizer_dir, "train.batch_size=2", "parallel.mode=fsdp",
                        "train.async_save=true")
    run = tmp_path / "run"
    torchrun(2, "train", "--config", str(config), "--run-dir", str(run), "--no-progress")
    assert (run / "latest").read_text().strip() == "checkpoints/step_000006"
    for ckpt in ckpt_io.list_checkpoints(run):
        ckpt_io.verify_checkpoint(ckpt)
    _assert_same_steps(_steps(run), _steps(single_run), range(1, 7))
