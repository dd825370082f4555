"""Import the weights MiniMind's own trainer writes: `torch.save({k: v.half() for k, v in state_dict})`, a `.pth`
(`pretrain_768.pth`, `pretrain_512_moe.pth`, ...), or its `*_resume.pth` (the weights under "model"); and export a
checkpoint as such a `.pth`, for MiniMind's eval_llm.py and SFT trainer (`--from_weight`).

    import_minimind("out/pretrain_768.pth", "../minimind/model", "imported/mm3")
    export_minimind("runs/64m", "../minimind/out/pretrain_768.pth")

MiniMind's names are Hugging Face's (`model.layers.0.self_attn.q_proj.weight`, `lm_head.weight` tied), so the
import is a rename. The file holds no config: the shape is read from the tensors (hidden size, layers, heads from
the QK-norm width, kv heads, SwiGLU width, experts), and what tensors cannot tell takes MiniMind's defaults —
8 attention heads when there is no QK-norm to count them (MiniMind2), rms eps 1e-6 with QK-norm (MiniMind-3) and
1e-5 without (MiniMind2), RoPE theta 1e6, MoE routing top-1 (MiniMind-3) or top-2 (MiniMind2). `--config` or
`--set model.KEY=...` override them.
Loading uses `torch.load(weights_only=True)`: a .pth cannot run code.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from minipretrain.config import load_config, toml_value
from minipretrain.errors import UserError
from minipretrain.fileio import load_weights_only, replace_atomic
from minipretrain.interop.hf import check_tied, load_checked
from minipretrain.model import MiniMind
from minipretrain.tokenizer import Tokenizer
from minipretrain.train.checkpoint import write_model_checkpoint

MINIMIND2_HEADS = 8  # MiniMind's default head count, used when no QK-norm weight gives the head width


def read_pth(path: Path) -> dict[str, torch.Tensor]:
    """The weights of a MiniMind .pth, names without the `model.` prefix, the tied head dropped."""
    if not path.is_file():
        raise UserError(f"--pth {path} not found")
    state = load_weights_only(path)
    if isinstance(state, dict) and isinstance(state.get("model"), dict):  # a *_resume.pth
        state = state["model"]
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise UserError(f"--pth {path} is not a state dict of tensors (MiniMind's trainer saves one per checkpoint)")
    state = {k.removeprefix("_orig_mod.").removeprefix("module.").removeprefix("model."): v for k, v in state.items()}
    head = state.pop("lm_head.weight", None)
    if "embed_tokens.weight" not in state:
        raise UserError(f"--pth {path} has no model.embed_tokens.weight: not a MiniMind language model")
    check_tied(head, state["embed_tokens.weight"], f"--pth {path}")
    return state


def infer_model_config(state: dict[str, torch.Tensor], source: str) -> dict:
    """ModelConfig keys read from the tensors' shapes, MiniMind's defaults for what shapes cannot tell."""
    try:
        return _infer(state)
    except KeyError as e:
        raise UserError(f"{source} has no model.{e.args[0]}: not a MiniMind language model "
                        "(or a truncated file)") from None
    except (ValueError, IndexError, ZeroDivisionError) as e:  # no layers, odd names, a tensor of the wrong rank
        raise UserError(f"{source}: the tensors do not have MiniMind's shapes ({e}): pass --config") from None


def _infer(state: dict[str, torch.Tensor]) -> dict:
    vocab, hidden = state["embed_tokens.weight"].shape
    layers = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("layers."))
    qk_norm = "layers.0.self_attn.q_norm.weight" in state
    head_dim = state["layers.0.self_attn.q_norm.weight"].numel() if qk_norm else hidden // MINIMIND2_HEADS
    moe = "layers.0.mlp.gate.weight" in state
    ffn = "layers.0.mlp.experts.0.gate_proj.weight" if moe else "layers.0.mlp.gate_proj.weight"
    keys = {"vocab_size": vocab, "hidden_size": hidden, "num_hidden_layers": layers,
            "num_attention_heads": state["layers.0.self_attn.q_proj.weight"].size(0) // head_dim,
            "num_key_value_heads": state["layers.0.self_attn.k_proj.weight"].size(0) // head_dim,
            "intermediate_size": state[ffn].size(0), "qk_norm": qk_norm, "rms_norm_eps": 1e-6 if qk_norm else 1e-5,
            "rope_theta": 1e6, "max_position_embeddings": 32768}
    if moe:  # MiniMind-3 routes each token to 1 expert, MiniMind2 to 2 (plus its shared expert)
        shared = len({k.split(".")[4] for k in state if k.startswith("layers.0.mlp.shared_experts.")})
        keys.update(moe=True, num_experts=state["layers.0.mlp.gate.weight"].size(0),
                    num_experts_per_tok=1 if qk_norm else 2, num_shared_experts=shared,
                    moe_intermediate_size=state[ffn].size(0), router_aux_loss_coef=5e-4 if qk_norm else 0.1)
    return keys


def import_minimind(pth: str | Path, tokenizer_dir: str | Path, out: str | Path, config: str | None = None,
                    overrides: list[str] | tuple[str, ...] = ()) -> Path:
    """A checkpoint directory in `out` from a MiniMind .pth and MiniMind's tokenizer directory. The model shape
    comes from `config` (a preset) when given, else from the tensors; `overrides` (`model.KEY=VALUE`) go on top."""
    state = read_pth(Path(pth))
    tokenizer = Tokenizer.load(tokenizer_dir)
    shape = {} if config else infer_model_config(state, f"--pth {pth}")
    inferred = [f"model.{k}={toml_value(v)}" for k, v in shape.items()]
    cfg = load_config(config, [*inferred, *overrides])
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise UserError(f"--tokenizer {tokenizer_dir} has {tokenizer.vocab_size} tokens but the model only "
                        f"{cfg.model.vocab_size} embeddings: pass the tokenizer the model was trained with")
    cfg.data.tokenizer = str(Path(tokenizer_dir).resolve())
    model = MiniMind(cfg.model)
    load_checked(model, state, f"--pth {pth}")
    return write_model_checkpoint(out, model, cfg, tokenizer)


def minimind_layout(m) -> dict:
    """What MiniMind-3's trainer builds from `--hidden_size H --num_hidden_layers L [--use_moe 1]` alone (its
    MiniMindConfig defaults): the model keys an exported checkpoint must have for its weights to mean the same."""
    layout = {"vocab_size": 6400, "num_attention_heads": 8, "num_key_value_heads": 4, "qk_norm": True,
              "intermediate_size": 64 * math.ceil(m.hidden_size * math.pi / 64), "rms_norm_eps": 1e-6,
              "rope_theta": 1e6, "attention": "causal"}
    if m.moe:
        layout.update(num_experts=4, num_experts_per_tok=1, num_shared_experts=0, norm_topk_prob=True,
                      moe_intermediate_size=layout["intermediate_size"], router_bias_update_rate=0.0)
    return layout


def export_minimind(ckpt_path: str | Path, out: str | Path) -> tuple[Path, str]:
    """Write a checkpoint's weights as MiniMind's trainer saves them (fp16, `model.` names, the tied `lm_head.weight`
    beside the embedding) to the new file `out`; returns it and the MiniMind flags that rebuild the model. Only
    MiniMind-3's layout is exported (the presets minimind3-30m, minimind3-64m and minimind3-moe): another layout is
    refused with the keys that differ, since MiniMind's code would build a different model around the weights."""
    from minipretrain.train.checkpoint import load_model_from_checkpoint

    out = Path(out)
    model, _, cfg, ckpt = load_model_from_checkpoint(ckpt_path)
    m = cfg.model
    wrong = [f"model.{k} is {getattr(m, k)!r}, MiniMind's is {v!r}" for k, v in minimind_layout(m).items()
             if getattr(m, k) != v]
    if wrong:
        raise UserError(f"{ckpt} is not MiniMind-3's layout, which MiniMind's trainer builds from --hidden_size, "
                        f"--num_hidden_layers and --use_moe alone: {'; '.join(wrong)} (train from "
                        "configs/minimind3-64m.toml, -30m or -moe to export)")
    state = {k if k == "lm_head.weight" else f"model.{k}": v.detach().half().contiguous()
             for k, v in model.state_dict().items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    replace_atomic(out, lambda tmp: torch.save(state, tmp))  # never a half-written .pth under the final name
    flags = f"--hidden_size {m.hidden_size} --num_hidden_layers {m.num_hidden_layers}"
    return out, flags + (" --use_moe 1" if m.moe else "")
