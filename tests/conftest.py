import json
import os
import sys
from pathlib import Path

import pytest
import torch

from minipretrain.config import ModelConfig, load_config

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_benchmark(name: str):
    """benchmarks/<name>.py as a module (the benchmarks are scripts, not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"{name}_benchmark", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module

TINY_MODEL = ["model.vocab_size=320", "model.hidden_size=32", "model.num_hidden_layers=2",
              "model.num_attention_heads=4", "model.num_key_value_heads=2", "model.max_position_embeddings=128"]


# cuBLAS reads this once, at a process's first GPU matmul: set before any test runs one, so the deterministic-resume
# test works after others (the trainer sets it itself when train.deterministic starts a process).
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

# bf16 keeps 8 bits of mantissa: per-step losses of the test model in bf16 stay this close to float32's, and two
# bf16 runs that differ only in kernels (compiled / eager, FSDP offload / plain) stay this close to each other.
BF16_TOLERANCE = 0.02

# Devices a test body runs on: the CPU in every run, CUDA marked `cuda` (skipped without a GPU; on a GPU machine
# `pytest -m cuda` runs only these).
CUDA = pytest.param("cuda", marks=pytest.mark.cuda)
DEVICES = ["cpu", CUDA]


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


def tiny_model_config(**overrides) -> ModelConfig:
    values = dict(vocab_size=320, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128)
    values.update(overrides)
    return ModelConfig(**values)


def tiny_config(*overrides: str):
    """A whole training config for CPU tests: a 2-layer model, short rows, a few steps."""
    base = TINY_MODEL + ["train.batch_size=4", "train.seq_len=32", "train.max_steps=6", "train.eval_every=0",
                         "train.eval_batches=2", "train.save_every=0", "train.sample_tokens=8", "train.device=cpu",
                         "train.dtype=float32", "optim.lr=3e-3", "optim.warmup_steps=2", "data.val_fraction=0.05",
                         "data.prepare_workers=1"]
    if any(o.startswith("train.epochs=") for o in overrides):  # the run's length given the other way
        base.remove("train.max_steps=6")
    return load_config(None, base + list(overrides))


def shared_file(name: str) -> Path:
    path = SHARED_DATA / name
    if not path.is_file():
        pytest.skip(f"{path} not available")
    return path


@pytest.fixture(scope="session")
def shakespeare(tmp_path_factory) -> Path:
    """The first ~120 KB of tinyshakespeare, as a small text file: fast to tokenize, real text."""
    text = shared_file("tinyshakespeare.txt").read_text(encoding="utf-8")[:120_000]
    path = tmp_path_factory.mktemp("data") / "shakespeare.txt"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tokenizer_dir(shakespeare, tmp_path_factory) -> Path:
    from minipretrain.data.sources import iter_documents
    from minipretrain.tokenizer import train_tokenizer

    out = tmp_path_factory.mktemp("tok")
    train_tokenizer(iter_documents(str(shakespeare)), 320, show_progress=False).save(out)
    return out


def assert_cli_errors(bad_calls: dict[str, list[str]], capsys) -> None:
    """Each argv exits with status 2 and one `error: ...` line containing its message."""
    from minipretrain.cli import main

    for message, argv in bad_calls.items():
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, err


def step_losses(run_dir: Path) -> dict[int, float]:
    """{step: training loss} from a run's metrics.jsonl."""
    from minipretrain.train.metrics import read_metrics

    return {m["step"]: m["loss"] for m in read_metrics(run_dir / "metrics.jsonl") if "loss" in m}


def train_cmd(run_dir: Path, *extra: str) -> list[str]:
    """`minipretrain train` as a separate process (for tests that kill it)."""
    return [sys.executable, "-m", "minipretrain", "train", "--run-dir", str(run_dir), "--no-progress", *extra]


def data_overrides(data: Path, tokenizer_dir: Path) -> list[str]:
    """--set values that train on `data` with a ready tokenizer."""
    return [f"data.path={json.dumps(str(data))}", f"data.tokenizer={json.dumps(str(tokenizer_dir))}"]
