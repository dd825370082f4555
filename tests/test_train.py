import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import TINY_MODEL, assert_cli_errors, data_overrides, shared_file, step_losses, tiny_config, train_cmd

from minipretrain.errors import CheckpointError, ConfigError, DataError, UserError
from minipretrain.train import checkpoint as ckpt_io
from minipretrain.train.loop import train
from minipretrain.train.metrics import read_metrics

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_end_to_end_run_lowers_validation_loss_on_real_text(tmp_path):
    data = shared_file("sample_pretrain.jsonl")
    cfg = tiny_config(f"data.path={json.dumps(str(data))}", "train.max_steps=60", "train.eval_every=30",
                      "train.seq_len=64", "train.batch_size=8", "data.val_fraction=0.02", "train.eval_batches=4")
    summary = train(cfg, tmp_path / "run", show_progress=False)
    assert summary["final_val_loss"] < summary["first_val_loss"] - 1.0
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 61))
    for key in ("step", "loss", "lr", "grad_norm", "tokens", "elapsed", "tokens_per_s"):
        assert key in steps[0]
    assert steps[-1]["tokens"] == 60 * 8 * 64
    assert [r["step"] for r in records if "val_loss" in r] == [0, 30, 60]
    run = tmp_path / "run"
    assert (run / "samples.txt").read_text().strip()
    assert (run / "tokenizer" / "tokenizer.json").is_file()
    assert (run / "latest").read_text().strip() == "checkpoints/step_000060"


@pytest.mark.parametrize("layout", ["packed", "padded"])
@pytest.mark.parametrize("micro_batch,accum", [(4, 2), (2, 4)])
def test_gradient_accumulation_equals_one_big_batch(tmp_path, shakespeare, tokenizer_dir, layout, micro_batch, accum):
    common = [f"data.path={json.dumps(str(shakespeare))}", f"data.tokenizer={json.dumps(str(tokenizer_dir))}",
              f"data.layout={layout}", "train.max_steps=4", "data.val_fraction=0"]
    big = train(tiny_config(*common, "train.batch_size=8", "train.grad_accum=1"), tmp_path / "big", show_progress=False)
    acc = train(tiny_config(*common, f"train.batch_size={micro_batch}", f"train.grad_accum={accum}"), tmp_path / "acc",
                show_progress=False)
    a, b = step_losses(tmp_path / "big"), step_losses(tmp_path / "acc")
    assert a.keys() == b.keys() == {1, 2, 3, 4}
    for step in a:
        assert a[step] == pytest.approx(b[step], abs=1e-5)
    assert big["tokens"] == acc["tokens"]


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_kill_and_resume_gives_identicalstep_losses(tmp_path, shakespeare, tokenizer_dir, dtype):
    sets = [a for s in TINY_MODEL + [f"data.path={shakespeare}", f"data.tokenizer={tokenizer_dir}",
                                     "train.batch_size=4", "train.seq_len=32", "train.max_steps=60",
                                     "train.save_every=5", "train.eval_every=0", "train.device=cpu",
                                     f"train.dtype={dtype}",
                                     "model.dropout=0.1", "optim.warmup_steps=5", "data.val_fraction=0.05",
                                     "train.sample_every=3", "train.sample_tokens=4"]
            for a in ("--set", s)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    reference, crashed = tmp_path / "reference", tmp_path / "crashed"
    subprocess.run(train_cmd(reference, *sets), check=True, env=env, capture_output=True)

    proc = subprocess.Popen(train_cmd(crashed, *sets), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    metrics = crashed / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(step_losses(crashed)) >= 12:
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    killed_at = max(step_losses(crashed))
    assert 12 <= killed_at < 60
    resumed = subprocess.run(train_cmd(crashed, "--resume", *sets[-2:]), env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout
    assert step_losses(crashed) == step_losses(reference)  # exactly equal, every step
    # samples written after the checkpoint were rewound, not duplicated
    assert (crashed / "samples.txt").read_text() == (reference / "samples.txt").read_text()


def _short_run(tmp_path, shakespeare, tokenizer_dir, *extra):
    cfg = tiny_config(f"data.path={json.dumps(str(shakespeare))}", f"data.tokenizer={json.dumps(str(tokenizer_dir))}",
                      "train.save_every=2", *extra)
    return cfg, train(cfg, tmp_path / "run", show_progress=False)


def test_checkpoints_keep_last_k_and_resume_continues(tmp_path, shakespeare, tokenizer_dir):
    cfg, _ = _short_run(tmp_path, shakespeare, tokenizer_dir, "train.keep_checkpoints=2")
    run = tmp_path / "run"
    assert [p.name for p in ckpt_io.list_checkpoints(run)] == ["step_000004", "step_000006"]
    state = ckpt_io.load_train_state(run / "checkpoints" / "step_000006")
    assert state["step"] == 6 and state["tokens"] == 6 * 4 * 32
    assert {"scaler", "data"} <= state.keys()
    assert (run / "checkpoints" / "step_000006" / "rng_00000.pt").is_file()
    assert (run / "checkpoints" / "step_000006" / "dcp" / ".metadata").is_file()  # weights + optimizer
    cfg.train.max_steps = 8
    summary = train(cfg, run, resume=True, show_progress=False)
    assert summary["steps"] == 8
    assert sorted(step_losses(run)) == list(range(1, 9))


def test_resume_refuses_changed_model_or_tokenizer(tmp_path, shakespeare, tokenizer_dir):
    cfg, _ = _short_run(tmp_path, shakespeare, tokenizer_dir)
    run = tmp_path / "run"
    cfg.train.max_steps = 10
    cfg.model.hidden_size = 64
    with pytest.raises(CheckpointError, match=r"model.hidden_size is 32 in the checkpoint but 64"):
        train(cfg, run, resume=True, show_progress=False)
    cfg.model.hidden_size = 32
    other_tok = tmp_path / "other_tok"
    from minipretrain.tokenizer import train_tokenizer
    train_tokenizer(["a different corpus, entirely different " * 50], 300, show_progress=False).save(other_tok)
    cfg.data.tokenizer = str(other_tok)
    with pytest.raises(CheckpointError, match="another tokenizer"):
        train(cfg, run, resume=True, show_progress=False)


def test_existing_run_is_never_silently_restarted(tmp_path, shakespeare, tokenizer_dir):
    cfg, _ = _short_run(tmp_path, shakespeare, tokenizer_dir)
    with pytest.raises(UserError, match="already holds a run"):
        train(cfg, tmp_path / "run", show_progress=False)
    with pytest.raises(CheckpointError, match="nothing to resume"):
        train(cfg, tmp_path / "empty", resume=True, show_progress=False)
    cfg.train.max_steps = 6
    with pytest.raises(UserError, match="already at step 6"):
        train(cfg, tmp_path / "run", resume=True, show_progress=False)


def test_corrupt_checkpoint_is_detected_and_reported(tmp_path, shakespeare, tokenizer_dir):
    cfg, _ = _short_run(tmp_path, shakespeare, tokenizer_dir)
    run = tmp_path / "run"
    weights = run / "checkpoints" / "step_000006" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    cfg.train.max_steps = 8
    with pytest.raises(CheckpointError, match=r"corrupt.*model.safetensors.*earlier checkpoints.*step_000004"):
        train(cfg, run, resume=True, show_progress=False)
    # resuming explicitly from the earlier, intact checkpoint works
    summary = train(cfg, run, resume=str(run / "checkpoints" / "step_000004"), show_progress=False)
    assert summary["steps"] == 8


def test_crash_during_save_leaves_the_previous_checkpoint_intact(tmp_path, shakespeare, tokenizer_dir, monkeypatch):
    cfg, _ = _short_run(tmp_path, shakespeare, tokenizer_dir)
    run = tmp_path / "run"
    before = (run / "latest").read_text()

    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt_io, "write_weights", broken_save)  # after the weights' DCP shards are written
    cfg.train.max_steps = 8
    with pytest.raises(CheckpointError, match=r"saving .*step_000008 failed \(disk full\)"):
        train(cfg, run, resume=True, show_progress=False)
    assert (run / "latest").read_text() == before
    ckpt_io.verify_checkpoint(ckpt_io.resolve_checkpoint(run))
    assert not list((run / "checkpoints").glob(".tmp_*"))  # the torn save was removed
    (run / "checkpoints" / ".tmp_step_000007").mkdir()  # as a kill mid-save leaves one...
    monkeypatch.undo()
    cfg.train.max_steps = 8
    train(cfg, run, resume=True, show_progress=False)
    assert not list((run / "checkpoints").glob(".tmp_*"))  # ...and cleaned up by the next good save
    assert (run / "latest").read_text().strip() == "checkpoints/step_000008"


def test_incomplete_checkpoint_is_reported(tmp_path, shakespeare, tokenizer_dir):
    cfg, _ = _short_run(tmp_path, shakespeare, tokenizer_dir)
    run = tmp_path / "run"
    (run / "checkpoints" / "step_000006" / "meta.json").unlink()
    cfg.train.max_steps = 8
    with pytest.raises(CheckpointError, match="incomplete"):
        train(cfg, run, resume=True, show_progress=False)


def test_train_state_loads_with_weights_only(tmp_path, shakespeare, tokenizer_dir):
    _short_run(tmp_path, shakespeare, tokenizer_dir)
    path = tmp_path / "run" / "checkpoints" / "step_000006" / "train_state.pt"
    state = torch.load(path, weights_only=True)
    assert sum(state["data"]["drawn"]) == 6 * 4


def test_cli_generate_and_eval(tmp_path, shakespeare, tokenizer_dir, capsys):
    from minipretrain.cli import main

    _short_run(tmp_path, shakespeare, tokenizer_dir)
    run = tmp_path / "run"
    capsys.readouterr()
    main(["generate", "--ckpt", str(run), "--prompt", "ROMEO:", "--max-new-tokens", "12", "--device", "cpu"])
    assert capsys.readouterr().out.startswith("ROMEO:")
    main(["eval", "--ckpt", str(run), "--data", str(shakespeare), "--json", "--device", "cpu"])
    result = json.loads(capsys.readouterr().out)
    assert result["loss"] > 0 and result["perplexity"] == pytest.approx(2.718281828 ** result["loss"], rel=1e-6)
    assert 0 < result["bits_per_byte"] < 10
    bad_calls = {
        "no checkpoint": ["generate", "--ckpt", str(tmp_path / "nothing-here")],
        "leave no room within the model's max_position_embeddings=128":
            ["generate", "--ckpt", str(run), "--prompt", "word " * 200, "--device", "cpu"],
        "--seq-len 4096 exceeds the model's max_position_embeddings=128":
            ["eval", "--ckpt", str(run), "--data", str(shakespeare), "--seq-len", "4096", "--device", "cpu"],
        "not found": ["eval", "--ckpt", str(run), "--data", str(tmp_path / "missing.jsonl"), "--device", "cpu"],
    }
    assert_cli_errors(bad_calls, capsys)


def test_cli_refuses_bad_flags_before_any_work(tmp_path, capsys):
    missing = str(tmp_path / "no-such-run")  # the flag error comes first: nothing is loaded
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    generate = ["generate", "--ckpt", missing, "--device", "cpu"]
    evaluate = ["eval", "--ckpt", missing, "--data", missing, "--device", "cpu"]
    assert_cli_errors({
        "--temperature must be >= 0": [*generate, "--temperature", "-0.5"],
        "--top-p must be in (0, 1]": [*generate, "--top-p", "1.5"],
        "--top-p must be in (0, 1] (1 = no cut), got 0.0": [*generate, "--top-p", "0"],
        "--top-k must be at least 1": [*generate, "--top-k", "0"],
        "--max-new-tokens must be at least 1": [*generate, "--max-new-tokens", "0"],
        "--num-samples must be at least 1": [*generate, "--num-samples", "0"],
        "--device=tpu: unknown device (auto, cpu, cuda, cuda:N or mps)": ["generate", "--ckpt", missing,
                                                                          "--device", "tpu"],
        "--device=cpu:1: unknown device": [*evaluate[:-2], "--device", "cpu:1"],
        "--batch-size must be at least 1": [*evaluate, "--batch-size", "0"],
        "--seq-len must be at least 2": [*evaluate, "--seq-len", "1"],
        f"--run-dir {a_file} is a file": ["train", "--run-dir", str(a_file), "--config", "configs/tiny.toml"],
    }, capsys)
    for writes_a_directory in (["tokenizer", "train", "--data", "builtin:python-docs"],
                               ["data", "prepare", "--data", missing, "--tokenizer", missing],
                               ["checkpoint", "consolidate", missing]):
        assert_cli_errors({f"--out {a_file} is a file: give a directory": [*writes_a_directory, "--out", str(a_file)]},
                          capsys)
    assert a_file.read_text() == "x"


@pytest.mark.slow
@pytest.mark.parametrize("model", [[], ["model.moe=true", "model.num_experts=4", "model.num_experts_per_tok=2"]],
                         ids=["dense", "moe"])
def test_compiled_training_matches_eager(tmp_path, shakespeare, tokenizer_dir, model, capsys):
    """float32, so the tolerance is tight (bf16 and the GPU are in test_cuda.py). Blocks are compiled one by one,
    and the start-up says so and how long the first step (with compilation) took."""
    common = [f"data.path={json.dumps(str(shakespeare))}", f"data.tokenizer={json.dumps(str(tokenizer_dir))}",
              "train.max_steps=3", "data.val_fraction=0", *model]
    train(tiny_config(*common), tmp_path / "eager", show_progress=False)
    capsys.readouterr()
    train(tiny_config(*common, "train.compile=true"), tmp_path / "compiled", show_progress=False)
    out = capsys.readouterr().out
    assert "blocks compiled with torch.compile" in out and "step 1 took" in out and "compiling the blocks" in out
    eager, compiled = step_losses(tmp_path / "eager"), step_losses(tmp_path / "compiled")
    assert eager.keys() == compiled.keys() == {1, 2, 3}
    for step in eager:
        assert compiled[step] == pytest.approx(eager[step], abs=1e-4)


def test_separate_validation_file(tmp_path, shakespeare, tokenizer_dir):
    val = tmp_path / "val.jsonl"
    val.write_text("\n".join(json.dumps({"text": t}) for t in ["To be, or not to be.", "A horse! a horse!"]) + "\n")
    _cfg, summary = _short_run(tmp_path, shakespeare, tokenizer_dir, f"data.val_path={json.dumps(str(val))}",
                              "data.val_fraction=0")
    assert summary["first_val_loss"] is not None and summary["final_val_loss"] is not None
    evaluated = [m for m in read_metrics(tmp_path / "run" / "metrics.jsonl") if "val_loss" in m]
    assert [m["step"] for m in evaluated] == [0, 6]


def test_resume_drops_a_torn_metrics_line_and_later_steps(tmp_path):
    from minipretrain.train.metrics import MetricsLog

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 3.0}\n{"step": 2, "loss": 2.5}\n{"step": 3, "loss": 2.4}\n{"step": 4, "lo')
    log = MetricsLog(path, resume_step=2)
    log.write({"step": 3, "loss": 2.3})
    log.close()
    assert read_metrics(path) == [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.5}, {"step": 3, "loss": 2.3}]


def test_a_run_directory_in_use_is_refused_and_freed_when_its_process_dies(tmp_path, shakespeare, tokenizer_dir,
                                                                            capsys):
    from conftest import data_overrides

    from minipretrain.cli import main

    run = tmp_path / "run"
    config = tmp_path / "config.toml"
    config.write_text(tiny_config(*data_overrides(shakespeare, tokenizer_dir), "train.max_steps=2").to_toml())
    # another process holds the run directory, as a run still training there would
    hold = ("import sys, time; from pathlib import Path; from minipretrain.fileio import DirectoryLock; "
            "lock = DirectoryLock(Path(sys.argv[1])); print('locked', flush=True); time.sleep(120)")
    holder = subprocess.Popen([sys.executable, "-c", hold, str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        (run / "metrics.jsonl").write_text("{}\n")  # the other run's files
        train_argv = ["train", "--config", str(config), "--run-dir", str(run), "--no-progress"]
        assert_cli_errors({f"is in use by another run (pid {holder.pid} on": [*train_argv, "--overwrite"],
                           "is in use by another run": [*train_argv, "--resume"]}, capsys)
        assert (run / "metrics.jsonl").read_text() == "{}\n"  # nothing of the running run was deleted
    finally:
        holder.kill()
        holder.wait()
    main([*train_argv, "--overwrite"])  # the lock died with its process: no stale lock
    assert step_losses(run).keys() == {1, 2}
    main([*train_argv, "--overwrite"])  # and a finished run released it


def _val_losses(run: Path) -> dict[int, float]:
    return {m["step"]: m["val_loss"] for m in read_metrics(run / "metrics.jsonl") if "val_loss" in m}


def test_init_from_starts_a_fresh_run_from_a_checkpoints_weights(tmp_path, shakespeare, tokenizer_dir, capsys):
    from conftest import data_overrides

    from minipretrain.cli import main

    data = data_overrides(shakespeare, tokenizer_dir)
    train(tiny_config(*data, "train.max_steps=6"), tmp_path / "base", show_progress=False)
    base_final = _val_losses(tmp_path / "base")[6]
    # a new run from its weights: step 0 scores exactly what the base model scored at its end
    follow = tiny_config(*data, "train.max_steps=4", "train.save_every=2", "optim.lr=1e-3",
                         f"train.init_from={json.dumps(str(tmp_path / 'base'))}")
    train(follow, tmp_path / "follow", show_progress=False)
    assert _val_losses(tmp_path / "follow")[0] == pytest.approx(base_final, abs=1e-6)
    assert min(step_losses(tmp_path / "follow")) == 1  # a fresh step count
    assert "initialized from" in capsys.readouterr().out
    # such a run resumes like any other: stopped at 2, resumed to 4, the same losses
    train(tiny_config(*data, "train.max_steps=2", "train.save_every=2", "optim.lr=1e-3",
                      f"train.init_from={json.dumps(str(tmp_path / 'base'))}"), tmp_path / "split", show_progress=False)
    train(follow, tmp_path / "split", resume=True, show_progress=False)
    assert step_losses(tmp_path / "split") == pytest.approx(step_losses(tmp_path / "follow"), abs=1e-6)
    # from what `import hf` wrote: the same weights, the same start
    pytest.importorskip("transformers")
    main(["export", "hf", "--ckpt", str(tmp_path / "base"), "--out", str(tmp_path / "hf")])
    main(["import", "hf", "--model", str(tmp_path / "hf"), "--out", str(tmp_path / "imported")])
    train(tiny_config(*data, "train.max_steps=1", f"train.init_from={json.dumps(str(tmp_path / 'imported'))}"),
          tmp_path / "from_hf", show_progress=False)
    assert _val_losses(tmp_path / "from_hf")[0] == pytest.approx(base_final, abs=1e-6)
    # refused before the run directory is made: a missing checkpoint, another model shape
    for bad, message in [(str(tmp_path / "missing"), "train.init_from: no checkpoint at"),
                         (str(tmp_path / "base"), "cannot start from")]:
        extra = ["model.num_hidden_layers=3"] if message == "cannot start from" else []
        with pytest.raises(CheckpointError, match=message):
            train(tiny_config(*data, *extra, f"train.init_from={json.dumps(bad)}"), tmp_path / "new",
                  show_progress=False)
        assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("failure", ["zip_writer", "enospc", "async"])
def test_a_full_disk_during_a_save_is_one_line_and_loses_nothing(tmp_path, shakespeare, tokenizer_dir, capsys,
                                                                  monkeypatch, failure):
    """zip_writer: torch's zip writer's own message; enospc: the OS's; async: the zip writer's, in a background
    save (train.async_save) that the step loop does not wait for."""
    import errno

    from conftest import data_overrides

    from minipretrain.cli import main

    run = tmp_path / "run"
    config = tmp_path / "config.toml"
    config.write_text(tiny_config(*data_overrides(shakespeare, tokenizer_dir), "train.max_steps=4",
                                  "train.save_every=2", f"train.async_save={json.dumps(failure == 'async')}").to_toml())
    real_write_weights, real_torch_save = ckpt_io.write_weights, ckpt_io.torch.save

    def write_weights(state, path):  # the weights of the step-4 save hit a full disk half-way
        real_write_weights(state, path)
        if "step_000004" in str(path) and failure in ("zip_writer", "async"):
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    def torch_save(obj, path, *args, **kwargs):
        if "step_000004" in str(path) and failure == "enospc" and str(path).endswith(ckpt_io.STATE_FILE):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_torch_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(ckpt_io, "write_weights", write_weights)
    monkeypatch.setattr(ckpt_io.torch, "save", torch_save)
    argv = ["train", "--config", str(config), "--run-dir", str(run), "--no-progress"]
    cause = "[Errno 28] No space left on device" if failure == "enospc" else "unexpected pos 704 vs 598"
    assert_cli_errors({f"saving {run / 'checkpoints' / 'step_000004'} failed (": argv}, capsys)
    with pytest.raises(SystemExit):  # the same again, to read the whole line
        main([*argv, "--resume"])
    err = capsys.readouterr().err
    assert cause in err and "MiB free; the partial save was removed" in err
    assert f"the last good checkpoint is {run / 'checkpoints' / 'step_000002'}" in err and "--resume" in err
    # the partial save is gone, the good one and `latest` are intact, and the message named them
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_000002"]
    assert (run / "latest").read_text().strip() == "checkpoints/step_000002"
    monkeypatch.undo()
    main([*argv, "--resume"])  # space freed: the run continues from step 2
    assert (run / "latest").read_text().strip() == "checkpoints/step_000004"


def test_async_save_gives_the_same_checkpoints_and_losses(tmp_path, shakespeare, tokenizer_dir, monkeypatch):
    sets = [*data_overrides(shakespeare, tokenizer_dir), "train.max_steps=8", "train.save_every=2",
            "train.keep_checkpoints=10", "model.dropout=0.1"]
    train(tiny_config(*sets), tmp_path / "sync", show_progress=False)
    import threading

    from minipretrain.train import loop

    step_started, overlapped = threading.Event(), []
    real_write, real_lr_at = ckpt_io.CheckpointSaver._write, loop.lr_at

    def lr_at(step, *args):
        step_started.set()
        return real_lr_at(step, *args)

    def write(self, state, tied, tmp, final, *args):  # holds each save until the step loop has moved on
        if final.name != "step_000008":  # the last save: no step follows it
            step_started.clear()
            overlapped.append(step_started.wait(timeout=60))
        real_write(self, state, tied, tmp, final, *args)

    monkeypatch.setattr(loop, "lr_at", lr_at)
    monkeypatch.setattr(ckpt_io.CheckpointSaver, "_write", write)
    train(tiny_config(*sets, "train.async_save=true"), tmp_path / "async", show_progress=False)
    assert overlapped == [True, True, True]  # steps 3, 5 and 7 ran while the saves of 2, 4 and 6 were written
    assert step_losses(tmp_path / "async") == step_losses(tmp_path / "sync")
    for a, b in zip(ckpt_io.list_checkpoints(tmp_path / "async"), ckpt_io.list_checkpoints(tmp_path / "sync"),
                    strict=True):
        assert a.name == b.name
        meta_a, meta_b = (json.loads((c / "meta.json").read_text())["files"] for c in (a, b))
        for name in ("model.safetensors", "rng_00000.pt"):
            assert meta_a[name] == meta_b[name], (a.name, name)  # bitwise the same files
        state_a, state_b = (ckpt_io.load_train_state(c) for c in (a, b))
        assert {**state_a, "elapsed": 0} == {**state_b, "elapsed": 0}  # all but the wall-clock time
    monkeypatch.undo()
    cfg = tiny_config(*sets, "train.async_save=true", "train.max_steps=10")
    train(cfg, tmp_path / "async", resume=True, show_progress=False)
    assert (tmp_path / "async" / "latest").read_text().strip() == "checkpoints/step_000010"


def test_checkpoint_mirror_copies_and_backs_up_a_corrupt_primary(tmp_path, shakespeare, tokenizer_dir, capsys):
    mirror = tmp_path / "mirror"
    sets = [*data_overrides(shakespeare, tokenizer_dir), "train.max_steps=6", "train.save_every=2",
            f"train.checkpoint_mirror={json.dumps(str(mirror))}", "train.keep_checkpoints=2"]
    run = tmp_path / "run"
    train(tiny_config(*sets), run, show_progress=False)
    assert [p.name for p in ckpt_io.list_checkpoints(mirror)] == ["step_000004", "step_000006"]
    assert (mirror / "latest").read_text() == (run / "latest").read_text()
    ckpt_io.verify_checkpoint(mirror / "checkpoints" / "step_000006")
    with open(run / "checkpoints" / "step_000006" / "train_state.pt", "ab") as f:
        f.write(b"bit rot")
    capsys.readouterr()
    train(tiny_config(*sets, "train.max_steps=8"), run, resume=True, show_progress=False)
    out = capsys.readouterr().out
    assert "does not match its recorded checksum" in out and "resuming from the mirror's copy instead" in out
    assert f"resumed from {mirror / 'checkpoints' / 'step_000006'} at step 6" in out
    assert (run / "latest").read_text().strip() == "checkpoints/step_000008"
    with pytest.raises(UserError, match=r"checkpoint_mirror=.* already holds a run's checkpoints: pass --resume"):
        train(tiny_config(*sets), tmp_path / "another", show_progress=False)  # never two runs in one mirror
    with pytest.raises(CheckpointError, match="does not match its recorded checksum"):  # without a mirror: refused
        (run / "checkpoints" / "step_000008" / "train_state.pt").write_bytes(b"x")
        train(tiny_config(*sets[:-2], "train.max_steps=10"), run, resume=True, show_progress=False)


def test_branch_from_continues_a_checkpoint_into_a_new_run_with_a_new_schedule(tmp_path, shakespeare, tokenizer_dir,
                                                                               capsys):
    from minipretrain.cli import main
    from minipretrain.train.schedule import lr_at

    cfg = tiny_config(*data_overrides(shakespeare, tokenizer_dir), "train.max_steps=20", "train.save_every=5",
                      "train.keep_checkpoints=10", "optim.schedule=wsd", "model.dropout=0.1",
                      f"train.checkpoint_mirror={json.dumps(str(tmp_path / 'mir'))}")
    stable = tmp_path / "stable"
    train(cfg, stable, show_progress=False)
    before = {p: p.read_bytes() for d in (stable, tmp_path / "mir") for p in d.rglob("*")
              if p.is_file() and p.name != ".lock"}
    source = stable / "checkpoints" / "step_000010"
    same = tmp_path / "same"  # branched with the same schedule: exactly the original's steps 11-20
    main(["train", "--run-dir", str(same), "--branch-from", str(source), "--no-progress"])
    assert f"branched from {source} at step 10" in capsys.readouterr().out
    assert step_losses(same) == {s: loss for s, loss in step_losses(stable).items() if s > 10}
    decay = tmp_path / "decay"  # the WSD decay phase from step 10: 4 steps down to min_lr
    main(["train", "--run-dir", str(decay), "--branch-from", str(source), "--no-progress",
          "--set", "train.max_steps=14", "--set", "optim.decay_steps=4"])
    lrs = {r["step"]: r["lr"] for r in read_metrics(decay / "metrics.jsonl") if "lr" in r}
    decayed = tiny_config("train.max_steps=14", "optim.decay_steps=4", "optim.schedule=wsd").optim
    assert lrs == pytest.approx({s: lr_at(s - 1, decayed, 14) for s in range(11, 15)})
    assert lrs[14] == pytest.approx(cfg.optim.min_lr)
    assert step_losses(decay)[11] == step_losses(stable)[11]  # the same weights and batch, before the update
    after = {p: p.read_bytes() for d in (stable, tmp_path / "mir") for p in d.rglob("*")
             if p.is_file() and p.name != ".lock"}
    assert after == before  # the original run and its mirror are untouched (the branch does not inherit it)
    assert (decay / "latest").is_file()  # the refused --overwrite below deletes nothing
    assert_cli_errors({
        "already at step 10 >= train.max_steps=8": ["train", "--run-dir", str(decay), "--branch-from", str(source),
                                                    "--overwrite", "--set", "train.max_steps=8"],
        "is the branched run's mirror": ["train", "--run-dir", str(tmp_path / "m"), "--branch-from", str(source),
                                         "--set", f"train.checkpoint_mirror={json.dumps(str(tmp_path / 'mir'))}"],
        "pass one of them": ["train", "--run-dir", str(decay), "--resume", "--branch-from", str(source)],
        "is inside --run-dir": ["train", "--run-dir", str(stable), "--branch-from", str(source), "--overwrite"],
        "already holds a run": ["train", "--run-dir", str(decay), "--branch-from", str(source)],
        "no checkpoint at": ["train", "--run-dir", str(tmp_path / "x"), "--branch-from", str(tmp_path / "nothing")],
    }, capsys)


def test_a_branch_with_a_new_mixture_carries_the_unchanged_sources_over():
    from minipretrain.data.batches import MixtureSampler

    class Rows:
        seq_len, pad_id = 4, 0

        def __init__(self, n):
            self.n = n

        def __len__(self):
            return self.n

    old = MixtureSampler([("en", Rows(100))], [1.0], seed=1, fingerprints=["a"])
    old.next_samples(40)
    new = MixtureSampler([("en", Rows(100)), ("zh", Rows(50))], [0.2, 0.8], seed=1, fingerprints=["a", "b"])
    assert new.load_state_dict(old.state_dict(), carry_over=True) == ["en"]
    assert new.drawn == [40, 0]
    sources = [source for source, _, _ in new.next_samples(10)]
    assert sources.count(0) == 2 and sources.count(1) == 8  # the new weights, from the branch point on
    assert new.next_samples(1)[0][2] in (42, 8)  # draws continue from where each source was
    resumed = MixtureSampler([("en", Rows(100)), ("zh", Rows(50))], [0.2, 0.8], seed=1, fingerprints=["a", "b"])
    resumed.load_state_dict(new.state_dict())  # a resume of the branch is exact
    assert resumed.next_samples(5) == new.next_samples(5)
    with pytest.raises(DataError, match="the training data changed"):
        new.load_state_dict(old.state_dict())
    reweighted = MixtureSampler([("en", Rows(100)), ("zh", Rows(50))], [0.5, 0.5], seed=1, fingerprints=["a", "b"])
    assert reweighted.load_state_dict(new.state_dict(), carry_over=True) == ["en", "zh"]  # same sources, new weights
    sources = [source for source, _, _ in reweighted.next_samples(10)]
    assert sources.count(0) == 5  # 50/50 from the branch on, not a catch-up run of one source


EVIL = """
import os, sys, torch

class Evil:
    def __reduce__(self):  # unpickling this runs a command
        return (os.system, (f"touch {sys.argv[2]}",))

torch.save({"step": 2, "evil": Evil()}, sys.argv[1])
"""


def test_a_tampered_train_state_is_refused_in_one_line_and_never_runs(tmp_path, shakespeare, tokenizer_dir, capsys):
    """A train_state.pt replaced by a pickle that calls os.system, its checksum updated to match (a tamperer would):
    --resume refuses it in one line naming the file and the object, and the command never runs."""
    import hashlib
    import subprocess
    import sys

    from minipretrain.cli import main

    cfg = tiny_config(*data_overrides(shakespeare, tokenizer_dir), "train.max_steps=2")
    train(cfg, tmp_path / "run", show_progress=False)
    ckpt = tmp_path / "run" / "checkpoints" / "step_000002"
    marker = tmp_path / "pwned"
    subprocess.run([sys.executable, "-c", EVIL, str(ckpt / "train_state.pt"), str(marker)], check=True)
    meta = json.loads((ckpt / "meta.json").read_text())
    meta["files"]["train_state.pt"] = hashlib.sha256((ckpt / "train_state.pt").read_bytes()).hexdigest()
    (ckpt / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--run-dir", str(tmp_path / "run"), "--resume", "--set", "train.max_steps=4", "--no-progress"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1, err
    assert err == (f"error: refusing to load {ckpt / 'train_state.pt'}: it holds non-tensor objects (posix.system); "
                   "the file may be tampered with\n")
    assert not marker.exists()


def test_epochs_set_the_run_length_and_a_resume_keeps_it(tmp_path, shakespeare, tokenizer_dir, capsys, monkeypatch):
    import math

    from minipretrain.config import load_config
    from minipretrain.train.schedule import steps_for_epochs

    assert steps_for_epochs(2.0, rows=1000, rows_per_step=64) == 32  # 31.25: a partial last step counts
    assert steps_for_epochs(0.001, rows=1000, rows_per_step=64) == 1
    sets = [*data_overrides(shakespeare, tokenizer_dir), "train.batch_size=4", "train.grad_accum=2",
            "train.save_every=2"]
    cfg = tiny_config(*sets, "train.epochs=0.05")
    train(cfg, tmp_path / "run", show_progress=False)
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if line.startswith("train.epochs=0.05:"))
    rows = int(line.split(": ")[1].split(" training rows")[0].replace(",", ""))
    expected = math.ceil(0.05 * rows / 8)
    assert line.endswith(f"x 0.05 = {expected} steps") and rows > 2000 and expected > 10
    recorded = load_config(tmp_path / "run" / "config.toml").train
    assert (recorded.max_steps, recorded.epochs) == (expected, None)  # the resolved length, what a resume reads
    assert max(step_losses(tmp_path / "run")) == expected
    # a crash mid-run, then --resume from the run's own config: it ends at the same step
    from test_stability import Faults

    Faults(monkeypatch, {10: "crash"})  # after the save at step 8
    with pytest.raises(RuntimeError, match="injected crash"):
        train(cfg, tmp_path / "crashed", show_progress=False)
    monkeypatch.undo()
    summary = train(load_config(tmp_path / "crashed" / "config.toml"), tmp_path / "crashed", resume=True,
                    show_progress=False)
    assert summary["steps"] == expected and step_losses(tmp_path / "crashed") == step_losses(tmp_path / "run")


def test_a_mixture_epoch_is_a_pass_over_all_its_rows(tmp_path, shakespeare, tokenizer_dir, capsys):
    half = tmp_path / "half.txt"
    half.write_text(shakespeare.read_text(encoding="utf-8")[:60_000], encoding="utf-8")
    sources = (f'data.sources=[{{path = {json.dumps(str(shakespeare))}}}, {{path = {json.dumps(str(half))}, '
               'weight = 3.0}]')
    cfg = tiny_config(sources, f"data.tokenizer={json.dumps(str(tokenizer_dir))}", "train.epochs=0.002")
    train(cfg, tmp_path / "run", show_progress=False)
    out = capsys.readouterr().out
    counts = [int(re.search(r"([\d,]+) rows of", line).group(1).replace(",", "")) for line in out.splitlines()
              if line.startswith("train ") and " rows of " in line]
    line = next(line for line in out.splitlines() if line.startswith("train.epochs="))
    assert len(counts) == 2 and line.startswith(f"train.epochs=0.002: {sum(counts):,} training rows")


def test_epochs_and_max_steps_are_one_or_the_other(tmp_path):
    from minipretrain.config import load_config

    with pytest.raises(ConfigError, match=r"train\.epochs and train\.max_steps both set"):
        tiny_config("train.epochs=1", "train.max_steps=10")
    with pytest.raises(ConfigError, match=r"train\.epochs: must be positive"):
        tiny_config("train.epochs=0")
    preset = load_config(Path(__file__).parents[1] / "configs" / "tiny.toml", ["train.epochs=2"]).train
    # the preset's max_steps gives way
    assert preset.epochs == 2.0
    both = tmp_path / "both.toml"
    both.write_text("[train]\nepochs = 1.0\nmax_steps = 5\n")
    with pytest.raises(ConfigError, match=r"both\.toml: train\.epochs and train\.max_steps both set"):
        load_config(both)
    assert load_config(both, ["train.max_steps=7"]).train.max_steps == 7  # --set of one replaces the file's other
