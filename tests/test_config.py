"""Config: presets, `--set` parsing, validation errors that name the key, TOML round trip, CLI error path."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch

from minipretrain.cli import main
from minipretrain.config import Config, DataConfig, ModelConfig, OptimConfig, TrainConfig, load_config
from minipretrain.errors import ConfigError, UserError
from minipretrain.model import MiniMind

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
PRESETS = ["tiny.toml", "minimind2-26m.toml", "minimind2-104m.toml"]


def _num_parameters(cfg: ModelConfig) -> int:
    """Build on the meta device: same parameter shapes, no memory or init time."""
    with torch.device("meta"):
        return MiniMind(cfg).num_parameters()


# --- presets -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", PRESETS)
def test_presets_load(name):
    cfg = load_config(CONFIGS / name)
    assert isinstance(cfg, Config)
    assert isinstance(cfg.model, ModelConfig) and isinstance(cfg.train, TrainConfig)
    assert cfg.model.hidden_size % cfg.model.num_attention_heads == 0
    assert cfg.train.seq_len <= cfg.model.max_position_embeddings
    assert cfg.data.layout == "packed"
    # every preset value made it into the config (not silently replaced by a default)
    import tomllib

    raw = tomllib.loads((CONFIGS / name).read_text(encoding="utf-8"))
    for section, values in raw.items():
        for key, value in values.items():
            assert getattr(getattr(cfg, section), key) == value, f"{section}.{key}"


def test_tiny_preset_values():
    cfg = load_config(CONFIGS / "tiny.toml")
    assert (cfg.model.vocab_size, cfg.model.hidden_size, cfg.model.num_hidden_layers) == (4096, 192, 4)
    assert (cfg.model.num_attention_heads, cfg.model.num_key_value_heads) == (6, 2)
    assert cfg.data.path == "builtin:python-docs"
    # chosen by benchmarks/quality.py: Muon + WSD, one peak for both optimizers as measured
    assert (cfg.optim.name, cfg.optim.schedule, cfg.optim.lr, cfg.optim.muon_lr) == ("muon", "wsd", 4e-3, None)
    assert cfg.train.max_steps == 600 and cfg.train.seq_len == 256
    # keys not in the preset keep their defaults
    assert cfg.optim.beta2 == OptimConfig().beta2
    assert cfg.train.seed == TrainConfig().seed


def test_minimind2_26m_parameter_count():
    cfg = load_config(CONFIGS / "minimind2-26m.toml")
    n = _num_parameters(cfg.model)
    assert 25e6 <= n <= 27e6, n


def test_minimind2_104m_parameter_count():
    cfg = load_config(CONFIGS / "minimind2-104m.toml")
    n = _num_parameters(cfg.model)
    assert 100e6 <= n <= 110e6, n


def test_meta_and_real_parameter_counts_agree():
    cfg = load_config(None, ["model.hidden_size=64", "model.num_hidden_layers=2", "model.num_attention_heads=4",
                             "model.num_key_value_heads=2", "model.vocab_size=300",
                             "model.max_position_embeddings=64", "train.seq_len=32"])
    real = MiniMind(cfg.model).num_parameters()
    assert real == _num_parameters(cfg.model)
    m = cfg.model
    per_layer = (m.hidden_size * m.hidden_size * 2  # q, o
                 + 2 * m.hidden_size * m.num_key_value_heads * m.head_dim  # k, v
                 + 3 * m.hidden_size * m.intermediate_size  # gate, up, down
                 + 2 * m.hidden_size)  # two RMSNorms
    expected = m.vocab_size * m.hidden_size + m.num_hidden_layers * per_layer + m.hidden_size  # tied head
    assert real == expected


# --- defaults --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("hidden, expected", [(512, 1408), (768, 2048), (192, 512), (32, 128), (64, 192)])
def test_intermediate_size_default(hidden, expected):
    assert expected == 64 * math.ceil(8 * hidden / 3 / 64)
    assert ModelConfig(hidden_size=hidden).intermediate_size == expected
    heads = 8 if hidden % 16 == 0 else 2
    cfg = load_config(None, [f"model.hidden_size={hidden}", f"model.num_attention_heads={heads}",
                             f"model.num_key_value_heads={heads}"])
    assert cfg.model.intermediate_size == expected


def test_intermediate_size_explicit_is_kept():
    cfg = load_config(None, ["model.intermediate_size=1000"])
    assert cfg.model.intermediate_size == 1000


def test_default_config_is_valid():
    cfg = load_config(None)
    assert cfg == Config()
    assert cfg.model.intermediate_size == 1408


# --- --set overrides ---------------------------------------------------------------------------------------------


def test_set_parses_types():
    cfg = load_config(None, ["optim.lr=3e-4", "train.max_steps=7", "train.device=cpu", "model.qk_norm=true"])
    assert type(cfg.optim.lr) is float and cfg.optim.lr == 3e-4
    assert type(cfg.train.max_steps) is int and cfg.train.max_steps == 7
    assert type(cfg.train.device) is str and cfg.train.device == "cpu"
    assert type(cfg.model.qk_norm) is bool and cfg.model.qk_norm is True


def test_set_more_types():
    cfg = load_config(None, [
        "optim.lr=1",  # an int literal for a float key becomes a float
        "model.qk_norm=false",
        'train.sample_prompt="true"',  # quoted: a string, not a bool
        "train.device=cuda:1",
        "data.path=/tmp/some dir/data.jsonl",
        "data.tokenizer=runs/tok",
        " train.seed = 42 ",
    ])
    assert cfg.optim.lr == 1.0 and type(cfg.optim.lr) is float
    assert cfg.model.qk_norm is False
    assert cfg.train.sample_prompt == "true"
    assert cfg.train.device == "cuda:1"
    assert cfg.data.path == "/tmp/some dir/data.jsonl"
    assert cfg.data.tokenizer == "runs/tok"
    assert cfg.train.seed == 42


def test_set_overrides_file_and_later_set_wins(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[optim]\nlr = 1e-3\n[train]\nmax_steps = 5\nbatch_size = 3\n")
    cfg = load_config(path, ["optim.lr=3e-4", "train.max_steps=9", "train.max_steps=11"])
    assert cfg.optim.lr == 3e-4
    assert cfg.train.max_steps == 11
    assert cfg.train.batch_size == 3  # untouched file value


@pytest.mark.parametrize("item", ["optim.lr", "lr=3e-4", "optim.=3"])
def test_set_malformed_item(item):
    with pytest.raises(ConfigError) as e:
        load_config(None, [item])
    assert "section.key=value" in str(e.value)


def test_set_empty_section():
    with pytest.raises(ConfigError):
        load_config(None, [".lr=3"])


# --- validation: each error names the key --------------------------------------------------------------------------


INVALID = [
    (["model.hiden_size=64"], "model.hiden_size"),  # unknown key
    (["modle.hidden_size=64"], "modle"),  # unknown section
    (['model.hidden_size="big"'], "model.hidden_size"),
    (["model.hidden_size=big"], "model.hidden_size"),  # unquoted: a plain string, still the wrong type
    (["model.hidden_size=1.5"], "model.hidden_size"),
    (["train.max_steps=true"], "train.max_steps"),  # a bool is not an int
    (["optim.lr=fast"], "optim.lr"),
    (["model.qk_norm=1"], "model.qk_norm"),
    (["train.device=3"], "train.device"),
    (["model.hidden_size=100", "model.num_attention_heads=8"], "model.hidden_size"),
    (["model.num_attention_heads=8", "model.num_key_value_heads=3"], "model.num_attention_heads"),
    (["model.num_attention_heads=2", "model.num_key_value_heads=4", "model.hidden_size=64"],
     "model.num_attention_heads"),
    (["model.hidden_size=24", "model.num_attention_heads=8", "model.num_key_value_heads=2"],
     "model.hidden_size"),  # head dim 3 is odd: no rotary embeddings
    (["train.seq_len=2048", "model.max_position_embeddings=1024"], "train.seq_len"),
    (["train.batch_size=0"], "train.batch_size"),
    (["train.batch_size=-4"], "train.batch_size"),
    (["model.num_hidden_layers=-1"], "model.num_hidden_layers"),
    (["model.num_hidden_layers=0"], "model.num_hidden_layers"),
    (["model.vocab_size=0"], "model.vocab_size"),
    (["train.seq_len=0"], "train.seq_len"),
    (["train.max_steps=0"], "train.max_steps"),
    (["train.grad_accum=0"], "train.grad_accum"),
    (["model.intermediate_size=0"], "model.intermediate_size"),
    (["train.eval_every=-1"], "train.eval_every"),
    (["optim.schedule=linear"], "optim.schedule"),
    (["data.layout=stacked"], "data.layout"),
    (["optim.lr=0"], "optim.lr"),
    (["optim.min_lr=1.0"], "optim.min_lr"),  # above lr
    (["optim.warmup_steps=-1"], "optim.warmup_steps"),
    (["optim.decay_fraction=0"], "optim.decay_fraction"),
    (["optim.beta1=1.0"], "optim.beta1"),
    (["optim.grad_clip=-1"], "optim.grad_clip"),
    (["model.dropout=1.0"], "model.dropout"),
    (["data.val_fraction=1.0"], "data.val_fraction"),
    (["data.val_fraction=-0.1"], "data.val_fraction"),
    (['data.path=""'], "data.path"),
    (['data.text_field=""'], "data.text_field"),
    (["train.device=tpu"], "train.device"),
    (["train.device=cuda:x"], "train.device=cuda:x: unknown device"),
    (["train.dtype=fp8"], "train.dtype"),
]


@pytest.mark.parametrize("overrides, key", INVALID, ids=[" ".join(o) for o, _ in INVALID])
def test_invalid_config_names_the_key(overrides, key):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    assert key in str(e.value)
    assert isinstance(e.value, UserError)


def test_wrong_type_message_says_what_was_expected():
    with pytest.raises(ConfigError) as e:
        load_config(None, ['model.hidden_size="big"'])
    message = str(e.value)
    assert "int" in message and "big" in message


def test_unknown_key_lists_known_keys():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["optim.learning_rate=1e-3"])
    assert "optim.learning_rate" in str(e.value)
    assert "lr" in str(e.value).split("known", 1)[1]


@pytest.mark.parametrize("text, key", [
    ("[model]\nhidden_sise = 64\n", "model.hidden_sise"),
    ("[modle]\nhidden_size = 64\n", "modle"),
    ('[model]\nhidden_size = "big"\n', "model.hidden_size"),
    ("[model]\nhidden_size = 1.5\n", "model.hidden_size"),
    ("[train]\nbatch_size = 0\n", "train.batch_size"),
    ('[optim]\nschedule = "step"\n', "optim.schedule"),
    ('[data]\nlayout = "ragged"\n', "data.layout"),
    ("[model]\nmax_position_embeddings = 128\n[train]\nseq_len = 256\n", "train.seq_len"),
    ("model = 3\n", "model"),  # a section that is not a table
])
def test_invalid_toml_file_names_the_key(tmp_path, text, key):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert key in str(e.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(tmp_path / "nope.toml")
    assert "nope.toml" in str(e.value)


def test_invalid_toml_syntax(tmp_path):
    path = tmp_path / "broken.toml"
    path.write_text("[model\nhidden_size = \n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert "broken.toml" in str(e.value) and "TOML" in str(e.value)


# --- TOML round trip ------------------------------------------------------------------------------------------------


def _round_trip(cfg: Config, tmp_path: Path) -> Config:
    path = tmp_path / "round.toml"
    path.write_text(cfg.to_toml(), encoding="utf-8")
    return load_config(path)


@pytest.mark.parametrize("name", PRESETS)
def test_to_toml_round_trips_presets(tmp_path, name):
    cfg = load_config(CONFIGS / name)
    back = _round_trip(cfg, tmp_path)
    assert back == cfg
    assert back.to_toml() == cfg.to_toml()


def test_to_toml_round_trips_defaults(tmp_path):
    assert _round_trip(Config(), tmp_path) == Config()


def test_to_toml_round_trips_non_default_values(tmp_path):
    cfg = load_config(None, [
        "model.hidden_size=96", "model.num_attention_heads=6", "model.num_key_value_heads=3",
        "model.intermediate_size=250", "model.qk_norm=true", "model.rope_theta=1e4", "model.rms_norm_eps=1e-6",
        "model.dropout=0.1",
        "optim.lr=3e-4", "optim.min_lr=3e-5", "optim.schedule=wsd", "optim.decay_fraction=0.3", "optim.eps=1e-10",
        "data.layout=padded", "data.val_path=val.jsonl", "data.tokenizer=tok", "data.skip_bad_lines=true",
        "data.text_field=content", "data.val_fraction=0",
        "train.device=cpu", "train.dtype=float32", "train.max_steps=7", "train.compile=true",
    ])
    cfg.train.sample_prompt = 'He said "hi"\\ \n\tthen 西游记 🤖 \u3000 é \x01 end'
    cfg.data.path = "C:\\data\\corpus 1.jsonl"
    back = _round_trip(cfg, tmp_path)
    assert back == cfg
    for section in ("model", "data", "optim", "train"):
        for f in dataclasses.fields(getattr(cfg, section)):
            a, b = getattr(getattr(back, section), f.name), getattr(getattr(cfg, section), f.name)
            assert type(a) is type(b), f"{section}.{f.name}"


def test_to_toml_round_trips_none_as_default(tmp_path):
    cfg = Config(data=DataConfig(val_path=None, tokenizer=None))
    text = cfg.to_toml()
    assert "val_path" not in text and "tokenizer" not in text
    assert _round_trip(cfg, tmp_path) == cfg


def test_to_toml_round_trips_delete_character(tmp_path):
    """U+007F (DEL) must be escaped in a TOML basic string; json.dumps leaves it raw."""
    cfg = Config()
    cfg.train.sample_prompt = "before\x7fafter"
    assert _round_trip(cfg, tmp_path) == cfg


# --- the CLI error path -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, key", [
    ("[model]\nhidden_sise = 64\n", "model.hidden_sise"),
    ('[model]\nhidden_size = "big"\n', "model.hidden_size"),
    ("[train]\nbatch_size = 0\n", "train.batch_size"),
    ('[optim]\nschedule = "step"\n', "optim.schedule"),
])
def test_cli_train_bad_config_exits_2_with_one_line(tmp_path, capsys, text, key):
    bad = tmp_path / "bad.toml"
    bad.write_text(text)
    run_dir = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        main(["train", "--config", str(bad), "--run-dir", str(run_dir), "--no-progress"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
    assert key in lines[0]
    assert "Traceback" not in err
    assert not run_dir.exists()  # nothing was created before the config was checked


def test_cli_train_bad_set_exits_2(tmp_path, capsys):
    run_dir = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        main(["train", "--config", str(CONFIGS / "tiny.toml"), "--run-dir", str(run_dir),
              "--set", "train.seq_len=4096"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert err.startswith("error: ") and "train.seq_len" in err
    assert not run_dir.exists()


def test_cli_train_missing_config_file_exits_2(tmp_path, capsys):
    run_dir = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        main(["train", "--config", str(tmp_path / "missing.toml"), "--run-dir", str(run_dir)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "missing.toml" in err
    assert not run_dir.exists()
