"""Export to and import from Hugging Face transformers, and import of MiniMind's own .pth weights."""

import importlib.util
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from conftest import assert_cli_errors, tiny_config

from minipretrain.cli import main
from minipretrain.data.batches import make_rows
from minipretrain.data.shards import PreparedData, PrepareOptions, prepare
from minipretrain.generate import generate
from minipretrain.model import MiniMind
from minipretrain.tokenizer import Tokenizer
from minipretrain.train.checkpoint import load_model_from_checkpoint, write_model_checkpoint

transformers = pytest.importorskip("transformers")

PEER_MODEL = Path(__file__).resolve().parents[2] / "shared" / "peers" / "minimind" / "model"

# (name, --set overrides, the transformers class it must become)
LAYOUTS = [("dense", [], "LlamaForCausalLM"),
           ("qk_norm", ["model.qk_norm=true"], "Qwen3ForCausalLM"),
           ("moe_qk_norm", ["model.qk_norm=true", "model.moe=true", "model.num_experts_per_tok=2"],
            "Qwen3MoeForCausalLM"),
           ("moe", ["model.moe=true", "model.num_experts=3", "model.num_experts_per_tok=2"], "MixtralForCausalLM")]


def random_checkpoint(path: Path, tokenizer_dir: Path, *overrides: str, seed: int = 0) -> Path:
    """A weights-only checkpoint of the tiny test model with every weight random, the norms' included (at their
    initial 1.0 a swapped q_norm / k_norm would go unnoticed)."""
    cfg = tiny_config(*overrides)
    torch.manual_seed(seed)
    model = MiniMind(cfg.model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return write_model_checkpoint(path, model, cfg, Tokenizer.load(tokenizer_dir))


def load_hf(directory: Path):
    return transformers.AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32).eval()


@pytest.mark.parametrize("name,overrides,architecture", LAYOUTS, ids=[layout[0] for layout in LAYOUTS])
def test_export_loads_in_transformers_with_equal_logits(tmp_path, tokenizer_dir, capsys, name, overrides,
                                                        architecture):
    ckpt = random_checkpoint(tmp_path / "ckpt", tokenizer_dir, *overrides)
    main(["export", "hf", "--ckpt", str(ckpt), "--out", str(tmp_path / "hf"), "--verify"])
    assert "verified" in capsys.readouterr().out
    hf = load_hf(tmp_path / "hf")
    assert type(hf).__name__ == architecture and hf.config.tie_word_embeddings
    assert not any(f.suffix == ".py" for f in (tmp_path / "hf").iterdir())  # no custom code to trust
    ours = load_model_from_checkpoint(ckpt)[0].eval()
    ids = torch.randint(8, 320, (3, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (ours(ids).logits - hf(ids).logits).abs().max() < 1e-4
    generation = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert (generation["bos_token_id"], generation["eos_token_id"], generation["pad_token_id"]) == (1, 2, 0)
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    text = "To be, or not to be: that is the question."
    assert hf_tokenizer.encode(text, add_special_tokens=False) == Tokenizer.load(tokenizer_dir).encode(text)
    assert hf_tokenizer.eos_token_id == 2 and hf_tokenizer.pad_token_id == 0


@pytest.mark.parametrize("name,overrides,architecture", LAYOUTS, ids=[layout[0] for layout in LAYOUTS])
def test_export_then_import_gives_identical_weights(tmp_path, tokenizer_dir, name, overrides, architecture):
    # training-only settings too: they travel in config.json's "minipretrain" entry
    ckpt = random_checkpoint(tmp_path / "ckpt", tokenizer_dir, *overrides, "model.dropout=0.1",
                             "model.router_aux_loss_coef=0.02", "model.seq_aux=false")
    main(["export", "hf", "--ckpt", str(ckpt), "--out", str(tmp_path / "hf")])
    main(["import", "hf", "--model", str(tmp_path / "hf"), "--out", str(tmp_path / "back")])
    before, after = load_model_from_checkpoint(ckpt)[0], load_model_from_checkpoint(tmp_path / "back")[0]
    assert before.config == after.config
    for (name_a, a), (name_b, b) in zip(before.state_dict().items(), after.state_dict().items(), strict=True):
        assert name_a == name_b and torch.equal(a, b), name_a


def test_import_reads_a_directory_transformers_saved(tmp_path, tokenizer_dir):
    """save_pretrained of transformers 5 may store MoE experts fused (gate_up_proj); import splits them."""
    ckpt = random_checkpoint(tmp_path / "ckpt", tokenizer_dir, *LAYOUTS[2][1])
    main(["export", "hf", "--ckpt", str(ckpt), "--out", str(tmp_path / "hf")])
    load_hf(tmp_path / "hf").save_pretrained(str(tmp_path / "resaved"))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tmp_path / "hf" / name, tmp_path / "resaved" / name)
    main(["import", "hf", "--model", str(tmp_path / "resaved"), "--out", str(tmp_path / "back")])
    before, after = load_model_from_checkpoint(ckpt)[0], load_model_from_checkpoint(tmp_path / "back")[0]
    assert all(torch.equal(a, b) for a, b in zip(before.state_dict().values(), after.state_dict().values(),
                                                 strict=True))


def test_greedy_generation_in_transformers_matches_minipretrain_generate(tmp_path, tokenizer_dir, capsys):
    ckpt = random_checkpoint(tmp_path / "ckpt", tokenizer_dir, "model.qk_norm=true")
    main(["export", "hf", "--ckpt", str(ckpt), "--out", str(tmp_path / "hf")])
    prompt = "To be, or not"
    capsys.readouterr()
    main(["generate", "--ckpt", str(ckpt), "--prompt", prompt, "--temperature", "0", "--max-new-tokens", "24",
          "--device", "cpu", "--dtype", "float32"])
    printed = capsys.readouterr().out.rstrip("\n")
    tokenizer = Tokenizer.load(tokenizer_dir)
    prompt_ids = tokenizer.encode(prompt)
    out = load_hf(tmp_path / "hf").generate(torch.tensor([prompt_ids]), do_sample=False, max_new_tokens=24)
    new = out[0, len(prompt_ids):].tolist()
    new = new[: new.index(2)] if 2 in new else new  # ours stops before eos, transformers includes it
    assert len(new) >= 8  # a real comparison, not an immediate eos
    assert new == generate(load_model_from_checkpoint(ckpt)[0], prompt_ids, 24, temperature=0, eos_id=2)
    assert printed == prompt + tokenizer.decode(new)


def test_eval_loss_equals_the_loss_transformers_computes(tmp_path, tokenizer_dir, shakespeare, capsys):
    ckpt = random_checkpoint(tmp_path / "ckpt", tokenizer_dir)
    main(["export", "hf", "--ckpt", str(ckpt), "--out", str(tmp_path / "hf")])
    tokenizer = Tokenizer.load(tokenizer_dir)
    text = tmp_path / "text.txt"
    text.write_text(shakespeare.read_text()[:6000])
    prepare([str(text)], tokenizer, tmp_path / "data", PrepareOptions(val_fraction=0.0, workers=1),
            show_progress=False, log=lambda message: None)
    capsys.readouterr()
    main(["eval", "--ckpt", str(ckpt), "--data", str(tmp_path / "data"), "--split", "train", "--seq-len", "32",
          "--device", "cpu", "--dtype", "float32", "--json"])
    ours = json.loads(capsys.readouterr().out)
    rows = make_rows(PreparedData(tmp_path / "data", tokenizer.fingerprint).split("train"), "packed", 32, tokenizer,
                     for_eval=True)
    hf, nats, count = load_hf(tmp_path / "hf"), 0.0, 0
    with torch.no_grad():
        for i in range(len(rows)):
            tokens, labels, _ = rows.example(i)
            n = int((torch.as_tensor(labels[1:]) != -100).sum())  # transformers shifts the labels, as we do
            loss = hf(torch.as_tensor(tokens)[None].long(), labels=torch.as_tensor(labels)[None].long()).loss
            nats, count = nats + loss.item() * n, count + n
    assert ours["tokens"] == count > 1000
    assert ours["loss"] == pytest.approx(nats / count, abs=1e-4)


def test_export_dtypes(tmp_path, tokenizer_dir, capsys):
    ckpt = random_checkpoint(tmp_path / "ckpt", tokenizer_dir)
    main(["export", "hf", "--ckpt", str(ckpt), "--out", str(tmp_path / "bf16"), "--dtype", "bfloat16", "--verify"])
    assert "verified" in capsys.readouterr().out
    from safetensors import safe_open
    with safe_open(str(tmp_path / "bf16" / "model.safetensors"), framework="pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}  # noqa: SIM118
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["torch_dtype"] == "bfloat16"


def _peer_minimind():
    """MiniMind's own model code, read in place from the peer directory (never copied into the project)."""
    path = PEER_MODEL / "model_minimind.py"
    if not path.is_file():
        pytest.skip(f"{path} not available")
    spec = importlib.util.spec_from_file_location("peer_model_minimind", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_import_minimind_pth_matches_minimind_logits(tmp_path, capsys, moe):
    peer = _peer_minimind()
    config = peer.MiniMindConfig(hidden_size=64, num_hidden_layers=2, use_moe=moe, num_experts=4,
                                 num_experts_per_tok=1)  # MiniMind-3: 8 heads / 4 kv heads, QK-norm
    torch.manual_seed(0)
    model = peer.MiniMindForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0 if "norm" in name else 0.0, 0.1 if "norm" in name else 0.05)
    pth = tmp_path / f"pretrain_64{'_moe' if moe else ''}.pth"
    torch.save({k: v.half().cpu() for k, v in model.state_dict().items()}, pth)  # as MiniMind's trainer saves
    main(["import", "minimind", "--pth", str(pth), "--tokenizer", str(PEER_MODEL), "--out", str(tmp_path / "ck")])
    assert "wrote checkpoint" in capsys.readouterr().out
    ours, tokenizer, cfg, _ = load_model_from_checkpoint(tmp_path / "ck")
    assert (cfg.model.num_attention_heads, cfg.model.num_key_value_heads, cfg.model.qk_norm, cfg.model.moe) == (
        8, 4, True, moe)
    model.load_state_dict({k: v.float() for k, v in torch.load(pth, weights_only=True).items()})  # fp16-rounded
    ids = torch.randint(3, 6400, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (ours.eval()(ids).logits - model(ids).logits).abs().max() < 1e-4
    assert tokenizer.vocab_size == 6400


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_import_minimind2_layout_without_qk_norm(tmp_path, tokenizer_dir, moe):
    """MiniMind2's .pth has no q_norm / k_norm: 8 heads (MiniMind's default) and rms eps 1e-5 are assumed; its MoE
    routes top-2 and has a shared expert, counted from the tensors."""
    moe_keys = ["model.moe=true", "model.num_experts=4", "model.num_experts_per_tok=2",
                "model.num_shared_experts=1"] if moe else []
    cfg = tiny_config("model.hidden_size=64", "model.num_attention_heads=8", "model.num_key_value_heads=2",
                      "model.vocab_size=320", *moe_keys)
    torch.manual_seed(0)
    model = MiniMind(cfg.model)
    state = {f"model.{k}" if k != "lm_head.weight" else k: v.half() for k, v in model.state_dict().items()}
    torch.save(state, tmp_path / "pretrain_64.pth")
    main(["import", "minimind", "--pth", str(tmp_path / "pretrain_64.pth"), "--tokenizer", str(tokenizer_dir),
          "--out", str(tmp_path / "ck")])
    ours, _, imported, _ = load_model_from_checkpoint(tmp_path / "ck")
    assert (imported.model.num_attention_heads, imported.model.num_key_value_heads, imported.model.qk_norm,
            imported.model.rms_norm_eps) == (8, 2, False, 1e-5)
    if moe:
        assert (imported.model.num_experts, imported.model.num_experts_per_tok,
                imported.model.num_shared_experts) == (4, 2, 1)
    for k, v in model.state_dict().items():
        assert torch.equal(ours.state_dict()[k], v.half().float()), k


def test_export_and_import_refuse_what_does_not_fit(tmp_path, tokenizer_dir, capsys):
    shared = random_checkpoint(tmp_path / "shared", tokenizer_dir, "model.moe=true", "model.num_shared_experts=1")
    mlm = random_checkpoint(tmp_path / "mlm", tokenizer_dir, "train.objective=mlm")
    ckpt = random_checkpoint(tmp_path / "ckpt", tokenizer_dir)
    (tmp_path / "a_file").write_text("x")
    main(["export", "hf", "--ckpt", str(ckpt), "--out", str(tmp_path / "hf")])
    wrong = tmp_path / "wrong"
    shutil.copytree(tmp_path / "hf", wrong)
    config = json.loads((wrong / "config.json").read_text())
    (wrong / "config.json").write_text(json.dumps({**config, "intermediate_size": 96}))
    gemma = tmp_path / "gemma"
    shutil.copytree(tmp_path / "hf", gemma)
    (gemma / "config.json").write_text(json.dumps({**config, "model_type": "gemma"}))
    untied = tmp_path / "untied"
    shutil.copytree(tmp_path / "hf", untied)
    (untied / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": False}))
    broken = tmp_path / "broken"
    shutil.copytree(tmp_path / "hf", broken)
    (broken / "config.json").write_text("{not json")
    no_layers = tmp_path / "no_layers.pth"
    torch.save({"model.embed_tokens.weight": torch.zeros(320, 32)}, no_layers)
    bad_pth = tmp_path / "bad.pth"
    torch.save({"model.embed_tokens.weight": torch.zeros(320, 32), "model.layers.0.self_attn.q_proj.weight":
                torch.zeros(32, 32)}, bad_pth)
    export, out = ["export", "hf", "--ckpt"], ["--out", str(tmp_path / "new")]
    assert_cli_errors({
        "model.num_shared_experts=1: no stock transformers class": [*export, str(shared), *out],
        "a masked LM (model.attention=bidirectional)": [*export, str(mlm), *out],
        "--out " + str(tmp_path / "a_file") + " is a file": [*export, str(ckpt), "--out", str(tmp_path / "a_file")],
        "is a directory that is not empty": [*export, str(ckpt), "--out", str(tmp_path / "hf")],
        "not empty: choose a new directory": ["import", "hf", "--model", str(tmp_path / "hf"), "--out",
                                              str(tmp_path / "hf")],
        "config.json: not a readable JSON file": ["import", "hf", "--model", str(broken), *out],
        "the tensors do not have MiniMind's shapes": ["import", "minimind", "--pth", str(no_layers), "--tokenizer",
                                                      str(tokenizer_dir), *out],
        "no checkpoint at": [*export, str(tmp_path / "missing"), *out],
        "layers.0.mlp.gate_proj.weight has shape (128, 32) but the config needs (96, 32)":
            ["import", "hf", "--model", str(wrong), *out],
        "model_type 'gemma' is not one minipretrain can express": ["import", "hf", "--model", str(gemma), *out],
        "is not tied": ["import", "hf", "--model", str(untied), *out],
        "no config.json": ["import", "hf", "--model", str(tmp_path / "missing"), *out],
        "--pth " + str(tmp_path / "nope.pth") + " not found":
            ["import", "minimind", "--pth", str(tmp_path / "nope.pth"), "--tokenizer", str(tokenizer_dir), *out],
        "bad.pth has no model.layers.0.self_attn.k_proj.weight: not a MiniMind language model":
            ["import", "minimind", "--pth", str(bad_pth), "--tokenizer", str(tokenizer_dir), *out],
    }, capsys)
    assert not (tmp_path / "new").exists()  # nothing half-written


def test_verify_refuses_a_difference_or_nan(tmp_path, tokenizer_dir, capsys, monkeypatch):
    from minipretrain.interop import hf

    ckpt = random_checkpoint(tmp_path / "ckpt", tokenizer_dir)
    for i, difference in enumerate([float("nan"), 3e-3]):
        monkeypatch.setattr(hf, "verify_export", lambda *args, d=difference: d)
        assert_cli_errors({"please report this as a bug": ["export", "hf", "--ckpt", str(ckpt), "--out",
                                                            str(tmp_path / f"hf{i}"), "--verify"]}, capsys)


def test_export_without_transformers_names_the_extra(tmp_path, tokenizer_dir, capsys, monkeypatch):
    import builtins

    ckpt = random_checkpoint(tmp_path / "ckpt", tokenizer_dir)
    real_import = builtins.__import__

    def no_transformers(name, *args, **kwargs):
        if name == "transformers" or name.startswith("transformers."):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_transformers)
    main(["export", "hf", "--ckpt", str(ckpt), "--out", str(tmp_path / "hf")])  # writing needs no transformers
    assert (tmp_path / "hf" / "model.safetensors").is_file()
    capsys.readouterr()
    assert_cli_errors({"--verify needs transformers, which is not installed: pip install 'minipretrain[hf]'":
                       ["export", "hf", "--ckpt", str(ckpt), "--out", str(tmp_path / "hf2"), "--verify"]}, capsys)
    assert not (tmp_path / "hf2").exists()  # refused before anything was written


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_export_minimind_loads_in_minimind_with_equal_logits(tmp_path, capsys, moe):
    """A MiniMind-3-layout checkpoint written as MiniMind's trainer saves its weights: MiniMind's own model class,
    built from --hidden_size / --num_hidden_layers / --use_moe alone, loads it strictly and computes our logits."""
    peer = _peer_minimind()
    width = 64 * math.ceil(64 * math.pi / 64)  # MiniMind-3's SwiGLU width at hidden 64
    moe_keys = ("model.moe=true", "model.num_experts=4", "model.num_experts_per_tok=1", "model.num_shared_experts=0",
                f"model.moe_intermediate_size={width}") if moe else ()
    cfg = tiny_config("model.vocab_size=6400", "model.hidden_size=64", "model.num_attention_heads=8",
                      "model.num_key_value_heads=4", "model.qk_norm=true", f"model.intermediate_size={width}",
                      "model.rms_norm_eps=1e-6", *moe_keys)
    torch.manual_seed(0)
    ours = MiniMind(cfg.model)
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    ckpt = write_model_checkpoint(tmp_path / "ckpt", ours, cfg, Tokenizer.load(PEER_MODEL))
    out = tmp_path / "out" / f"pretrain_64{'_moe' if moe else ''}.pth"
    main(["export", "minimind", "--ckpt", str(ckpt), "--out", str(out)])
    assert f"--hidden_size 64 --num_hidden_layers 2{' --use_moe 1' if moe else ''}" in capsys.readouterr().out
    weights = torch.load(out, weights_only=True)
    assert {v.dtype for v in weights.values()} == {torch.float16}
    model = peer.MiniMindForCausalLM(peer.MiniMindConfig(hidden_size=64, num_hidden_layers=2, use_moe=moe)).eval()
    model.load_state_dict({k: v.float() for k, v in weights.items()}, strict=True)  # every name, every shape
    rounded = MiniMind(cfg.model).eval()
    rounded.load_state_dict({k.removeprefix("model."): v.float() for k, v in weights.items()})
    ids = torch.randint(3, 6400, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (rounded(ids).logits - model(ids).logits).abs().max() < 1e-4
        assert (ours.eval()(ids).logits - model(ids).logits).abs().max() < 0.05  # fp16 rounding of the weights


def test_export_minimind_refuses_other_layouts_and_existing_files(tmp_path, tokenizer_dir, capsys):
    ckpt = random_checkpoint(tmp_path / "ckpt", tokenizer_dir)  # the tiny test model: 4 heads, no QK-norm, ...
    (tmp_path / "taken.pth").write_bytes(b"")
    assert_cli_errors({
        "is not MiniMind-3's layout": ["export", "minimind", "--ckpt", str(ckpt), "--out", str(tmp_path / "a.pth")],
        "model.num_attention_heads is 4, MiniMind's is 8": ["export", "minimind", "--ckpt", str(ckpt), "--out",
                                                             str(tmp_path / "b.pth")],
        "already exists": ["export", "minimind", "--ckpt", str(ckpt), "--out", str(tmp_path / "taken.pth")],
        "MiniMind's trainer loads .pth files": ["export", "minimind", "--ckpt", str(ckpt), "--out",
                                                str(tmp_path / "c.bin")],
    }, capsys)
    assert not (tmp_path / "a.pth").exists()


def test_import_minimind_refuses_a_pth_that_would_run_code(tmp_path, capsys):
    import subprocess
    import sys

    from test_train import EVIL

    pth, marker = tmp_path / "pretrain_768.pth", tmp_path / "pwned"
    subprocess.run([sys.executable, "-c", EVIL, str(pth), str(marker)], check=True)
    assert_cli_errors({f"refusing to load {pth}: it holds non-tensor objects (posix.system); the file may be "
                       "tampered with": ["import", "minimind", "--pth", str(pth), "--tokenizer", str(PEER_MODEL),
                                         "--out", str(tmp_path / "ck")]}, capsys)
    assert not marker.exists() and not (tmp_path / "ck").exists()
