from pathlib import Path

import pytest
import torch

from minipretrain.config import ModelConfig, load_config

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

TINY_MODEL = ["model.vocab_size=320", "model.hidden_size=32", "model.num_hidden_layers=2",
              "model.num_attention_heads=4", "model.num_key_value_heads=2", "model.max_position_embeddings=128"]


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
