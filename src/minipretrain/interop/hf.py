"""Hugging Face `transformers` directories: export a checkpoint as a stock architecture, import one back.

    export_hf("runs/demo", "hf/demo")      # then AutoModelForCausalLM.from_pretrained("hf/demo"), no remote code
    import_hf("hf/demo", "imported/demo")  # a checkpoint directory that generate / eval / train.init_from read

Which stock class a model becomes (`hf_model_type`):
    dense                          -> LlamaForCausalLM
    dense, model.qk_norm           -> Qwen3ForCausalLM      (per-head RMSNorm on q and k)
    MoE, model.qk_norm             -> Qwen3MoeForCausalLM   (softmax router, top-k, optional renormalisation)
    MoE without qk_norm            -> MixtralForCausalLM    (the same router; always renormalises the top-k)
Refused with a one-line error: masked LMs (bidirectional attention), shared experts (no stock class adds an ungated
always-on expert to this router) and loss-free balancing's selection bias (no stock class has it).
Nothing here imports `transformers`: writing and reading the files needs only safetensors; `verify_export` (and
`minipretrain export hf --verify`) loads the result in transformers to compare logits.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from minipretrain.config import Config, ModelConfig, validate
from minipretrain.errors import ConfigError, UserError
from minipretrain.fileio import new_directory
from minipretrain.model import MiniMind
from minipretrain.tokenizer import Tokenizer
from minipretrain.train.checkpoint import load_model_from_checkpoint, write_model_checkpoint

ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM",
                 "mixtral": "MixtralForCausalLM"}
EXPORT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
WEIGHTS_FILE, INDEX_FILE = "model.safetensors", "model.safetensors.index.json"
# Settings that change training, not the function a model computes: kept in config.json under "minipretrain" so
# that export then import gives back the same config (transformers ignores the entry).
TRAINING_KEYS = ("dropout", "seq_aux", "router_aux_loss_coef", "initializer_range", "intermediate_size")
# Mixtral's checkpoint names for the MoE block and its experts' three matrices (ours follow Qwen / MiniMind).
MIXTRAL_RENAMES = ((".mlp.", ".block_sparse_moe."), (".gate_proj.", ".w1."), (".up_proj.", ".w3."),
                   (".down_proj.", ".w2."))


def hf_model_type(m: ModelConfig) -> str:
    """The stock transformers model type that computes exactly what this config does, or a one-line error."""
    if m.attention != "causal":
        raise UserError("a masked LM (model.attention=bidirectional) has no transformers causal-LM class: export "
                        "needs a model trained with train.objective=clm or fim")
    if not m.moe:
        return "qwen3" if m.qk_norm else "llama"
    if m.num_shared_experts:
        raise UserError(f"model.num_shared_experts={m.num_shared_experts}: no stock transformers class adds "
                        "ungated shared experts to a softmax top-k router (Qwen2-MoE gates its shared expert); "
                        "export works for MoE models without shared experts")
    if m.router_bias_update_rate > 0:
        raise UserError("model.router_bias_update_rate > 0: the expert-selection bias of loss-free balancing has no "
                        "place in Qwen3-MoE or Mixtral; export works for models trained without it")
    if m.qk_norm:
        return "qwen3_moe"
    if not m.norm_topk_prob:
        raise UserError("model.norm_topk_prob=false without model.qk_norm: Mixtral (the stock MoE class without "
                        "QK-norm) always renormalises the top-k weights; Qwen3-MoE needs qk_norm")
    return "mixtral"


def hf_config(m: ModelConfig, model_type: str, dtype: str, tokenizer: Tokenizer) -> dict:
    """config.json for `model_type`, every field that affects the computation written out (no class defaults)."""
    config = {
        "architectures": [ARCHITECTURES[model_type]], "model_type": model_type, "vocab_size": m.vocab_size,
        "hidden_size": m.hidden_size, "intermediate_size": m.intermediate_size,
        "num_hidden_layers": m.num_hidden_layers, "num_attention_heads": m.num_attention_heads,
        "num_key_value_heads": m.num_key_value_heads, "head_dim": m.head_dim, "hidden_act": "silu",
        "max_position_embeddings": m.max_position_embeddings, "rms_norm_eps": m.rms_norm_eps,
        # transformers 4.x reads rope_theta, 5.x rope_parameters (and converts rope_theta)
        "rope_theta": m.rope_theta, "rope_parameters": {"rope_type": "default", "rope_theta": m.rope_theta},
        "rope_scaling": None, "attention_bias": False, "attention_dropout": 0.0, "tie_word_embeddings": True,
        "initializer_range": m.initializer_range, "bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id,
        "pad_token_id": tokenizer.pad_id, "use_cache": True, "torch_dtype": dtype,
        "minipretrain": {key: getattr(m, key) for key in TRAINING_KEYS},
    }
    if model_type == "llama":
        config.update(mlp_bias=False, pretraining_tp=1)
    elif model_type == "qwen3":
        config.update(use_sliding_window=False, sliding_window=None, max_window_layers=m.num_hidden_layers)
    elif model_type == "qwen3_moe":
        config.update(num_experts=m.num_experts, num_experts_per_tok=m.num_experts_per_tok,
                      moe_intermediate_size=m.moe_intermediate_size, norm_topk_prob=m.norm_topk_prob,
                      decoder_sparse_step=1, mlp_only_layers=[], router_aux_loss_coef=m.router_aux_loss_coef,
                      output_router_logits=False, use_sliding_window=False, sliding_window=None,
                      max_window_layers=m.num_hidden_layers)
    else:  # mixtral: every layer's MLP is the MoE block, its experts moe_intermediate_size wide
        config.update(num_local_experts=m.num_experts, num_experts_per_tok=m.num_experts_per_tok,
                      intermediate_size=m.moe_intermediate_size, router_aux_loss_coef=m.router_aux_loss_coef,
                      output_router_logits=False, sliding_window=None)
    return config


def to_hf_name(name: str, model_type: str) -> str:
    """Our parameter name -> the transformers checkpoint's (`layers.0.mlp...` -> `model.layers.0.mlp...`)."""
    name = f"model.{name}"
    if model_type == "mixtral":
        for ours, theirs in MIXTRAL_RENAMES:
            name = name.replace(ours, theirs)
    return name


def from_hf_name(name: str, model_type: str) -> str:
    if model_type == "mixtral":
        for ours, theirs in MIXTRAL_RENAMES:
            name = name.replace(theirs, ours)
    return name.removeprefix("model.")


def export_hf(ckpt: str | Path, out: str | Path, dtype: str = "float32") -> tuple[Path, str]:
    """Write `out` (weights, config.json, generation_config.json, tokenizer) from a checkpoint, single-process or
    sharded (DCP); returns (out, the model type)."""
    if dtype not in EXPORT_DTYPES:
        raise ConfigError(f"--dtype {dtype}: choose one of {', '.join(EXPORT_DTYPES)}")
    model, tokenizer, cfg, _ = load_model_from_checkpoint(ckpt)
    model_type = hf_model_type(cfg.model)  # refused before anything is written
    # The tied head is the embedding: transformers re-ties it from tie_word_embeddings, so it is stored once.
    tensors = {to_hf_name(name, model_type): tensor.detach().to(EXPORT_DTYPES[dtype]).contiguous()
               for name, tensor in model.state_dict().items() if name != "lm_head.weight"}
    config = hf_config(cfg.model, model_type, dtype, tokenizer)
    generation = {key: config[key] for key in ("bos_token_id", "eos_token_id", "pad_token_id")}
    with new_directory(out) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        tokenizer.save(tmp)
    return Path(out), model_type


def _field(config: dict, key: str, source: str, default=None):
    value = config.get(key, default)
    if value is None:
        raise UserError(f"{source}: config.json has no {key}")
    return value


def model_config_from_hf(config: dict, source: str) -> ModelConfig:
    """Our ModelConfig for a transformers config.json, or a one-line error naming the field that does not fit."""
    model_type = config.get("model_type")
    if model_type not in ARCHITECTURES:
        raise UserError(f"{source}: model_type {model_type!r} is not one minipretrain can express "
                        f"({', '.join(ARCHITECTURES)})")

    def require(condition: bool, what: str) -> None:
        if not condition:
            raise UserError(f"{source}: {what}, which the MiniMind model cannot express")

    for key in ("hidden_size", "num_attention_heads", "num_hidden_layers", "vocab_size", "intermediate_size",
                "max_position_embeddings"):
        if not isinstance(config.get(key), int) or config[key] <= 0:
            raise UserError(f"{source}: {key} must be a positive integer, got {config.get(key)!r}")
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    require(config.get("hidden_act", "silu") == "silu", f"hidden_act is {config.get('hidden_act')!r}, not silu")
    require(not config.get("attention_bias") and not config.get("mlp_bias"), "it has bias terms")
    require(config.get("tie_word_embeddings") is True, "its output head is not tied to the embedding "
                                                       "(tie_word_embeddings is not true)")
    require(config.get("head_dim") in (None, hidden // heads),
            f"head_dim={config.get('head_dim')} differs from hidden_size / num_attention_heads = {hidden // heads}")
    rope = config.get("rope_parameters") or {}
    require(not config.get("rope_scaling") and rope.get("rope_type", "default") == "default",
            "it uses RoPE scaling")
    require(not config.get("use_sliding_window") and not (model_type in ("mixtral", "llama")
                                                          and config.get("sliding_window")),
            "it uses sliding-window attention")
    moe = model_type in ("qwen3_moe", "mixtral")
    if model_type == "qwen3_moe":
        require(not config.get("mlp_only_layers") and config.get("decoder_sparse_step", 1) == 1,
                "some of its layers are dense (mlp_only_layers / decoder_sparse_step)")
    width = config["intermediate_size"]  # checked positive above
    m = ModelConfig(
        vocab_size=config["vocab_size"], hidden_size=hidden,
        num_hidden_layers=config["num_hidden_layers"], num_attention_heads=heads,
        num_key_value_heads=config.get("num_key_value_heads") or heads, intermediate_size=width,
        max_position_embeddings=config["max_position_embeddings"],
        rope_theta=float(config.get("rope_theta") or rope.get("rope_theta") or 10000.0),
        rms_norm_eps=float(_field(config, "rms_norm_eps", source)), qk_norm=model_type in ("qwen3", "qwen3_moe"),
        initializer_range=float(config.get("initializer_range", 0.02)), moe=moe)
    if moe:
        # transformers 5 writes num_local_experts for both; Qwen3-MoE checkpoints on the Hub say num_experts
        m.num_experts = _field(config, "num_local_experts", source, config.get("num_experts"))
        m.num_experts_per_tok = _field(config, "num_experts_per_tok", source)
        m.moe_intermediate_size = config.get("moe_intermediate_size", width) if model_type == "qwen3_moe" else width
        m.norm_topk_prob = bool(config.get("norm_topk_prob", True)) if model_type == "qwen3_moe" else True
        m.router_aux_loss_coef = float(config.get("router_aux_loss_coef", 0.01))
    for key, value in (config.get("minipretrain") or {}).items():  # written by our export: training settings
        if key in TRAINING_KEYS and (key != "intermediate_size" or moe):  # a dense width is in the shapes
            setattr(m, key, value)
    return m


def read_safetensors(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a transformers directory: one model.safetensors or the shards its index lists."""
    if (directory / INDEX_FILE).is_file():
        files = sorted(set(read_json(directory / INDEX_FILE).get("weight_map", {}).values()))
    elif (directory / WEIGHTS_FILE).is_file():
        files = [WEIGHTS_FILE]
    else:
        raise UserError(f"{directory}: no {WEIGHTS_FILE} or {INDEX_FILE} (only safetensors weights are read; "
                        "a pickled pytorch_model.bin is never loaded)")
    tensors = {}
    for name in files:
        try:
            with safe_open(str(directory / name), framework="pt") as f:
                tensors.update({key: f.get_tensor(key) for key in f.keys()})  # noqa: SIM118 (no iterator)
        except Exception as e:  # safetensors raises its own error types, and OSError for a missing file
            raise UserError(f"{directory / name}: cannot be read as safetensors ({e})") from None
    return tensors


def read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: not a readable JSON file ({e})") from None
    if not isinstance(value, dict):
        raise UserError(f"{path}: expected a JSON object")
    return value


def _split_fused_experts(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers 5 may save experts fused: `experts.gate_up_proj` (experts, 2*width, hidden) and
    `experts.down_proj` (experts, hidden, width); split them into the per-expert matrices we hold."""
    out = {}
    for name, tensor in tensors.items():
        prefix, _, last = name.rpartition(".experts.")
        if last == "gate_up_proj":
            width = tensor.size(1) // 2
            for e in range(tensor.size(0)):
                out[f"{prefix}.experts.{e}.gate_proj.weight"] = tensor[e, :width]
                out[f"{prefix}.experts.{e}.up_proj.weight"] = tensor[e, width:]
        elif last == "down_proj":
            for e in range(tensor.size(0)):
                out[f"{prefix}.experts.{e}.down_proj.weight"] = tensor[e]
        else:
            out[name] = tensor
    return out


def check_tied(head: torch.Tensor | None, embedding: torch.Tensor, source: str) -> None:
    """The output head, when a file stores it, must be the embedding: our model ties them."""
    if head is not None and not torch.equal(head, embedding):
        raise UserError(f"{source}: lm_head.weight differs from the embedding: the model is not tied "
                        "(minipretrain's MiniMind ties them)")


def load_checked(model: MiniMind, state: dict[str, torch.Tensor], source: str) -> None:
    """Load `state` into `model` after checking that names and shapes match exactly; a one-line error naming the
    first tensor that does not fit."""
    expected = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        parts = ([f"missing {missing[0]}" + (f" and {len(missing) - 1} more" if len(missing) > 1 else "")]
                 if missing else []) + ([f"unexpected {unexpected[0]}"
                                         + (f" and {len(unexpected) - 1} more" if len(unexpected) > 1 else "")]
                                        if unexpected else [])
        raise UserError(f"{source}: the weights do not match the model config ({'; '.join(parts)})")
    for name, tensor in expected.items():  # in the model's order: the first misfit named is the earliest layer's
        if tuple(state[name].shape) != tuple(tensor.shape):
            raise UserError(f"{source}: {name} has shape {tuple(state[name].shape)} but the config needs "
                            f"{tuple(tensor.shape)}")
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)


def import_hf(model_dir: str | Path, out: str | Path) -> tuple[Path, ModelConfig]:
    """A checkpoint directory in `out` from a Llama / Qwen3 / Qwen3-MoE / Mixtral transformers directory (float32
    weights; its tokenizer must have MiniMind's special tokens at ids 0-2)."""
    directory = Path(model_dir)
    if not (directory / "config.json").is_file():
        raise UserError(f"--model {directory}: no config.json (expected a transformers model directory)")
    config = read_json(directory / "config.json")
    model_cfg = model_config_from_hf(config, str(directory / "config.json"))
    model_type = config["model_type"]
    tokenizer = Tokenizer.load(directory)
    if tokenizer.vocab_size > model_cfg.vocab_size:
        raise UserError(f"{directory}: the tokenizer has {tokenizer.vocab_size} tokens but the model only "
                        f"{model_cfg.vocab_size} embeddings")
    tensors = _split_fused_experts(read_safetensors(directory))
    tensors = {from_hf_name(k, model_type): v for k, v in tensors.items() if not k.endswith("rotary_emb.inv_freq")}
    head = tensors.pop("lm_head.weight", None)
    check_tied(head, tensors.get("embed_tokens.weight", head), str(directory))
    cfg = Config(model=model_cfg)
    cfg.train.seq_len = min(cfg.train.seq_len, model_cfg.max_position_embeddings)
    validate(cfg)
    model = MiniMind(model_cfg)
    load_checked(model, tensors, str(directory))
    return write_model_checkpoint(out, model, cfg, tokenizer), model_cfg


def transformers_auto_model(what: str):
    """transformers.AutoModelForCausalLM, or a one-line error naming the extra that installs it."""
    try:
        from transformers import AutoModelForCausalLM
    except ImportError:
        raise UserError(f"{what} needs transformers, which is not installed: pip install 'minipretrain[hf]'") from None
    return AutoModelForCausalLM


@torch.no_grad()
def verify_export(ckpt: str | Path, out: str | Path, rows: int = 2, seq_len: int = 64) -> float:
    """Load the export in transformers and return the largest logit difference from our model on random tokens
    (both in float32, the exported weights as stored)."""
    auto_model = transformers_auto_model("--verify")
    ours, tokenizer, cfg, _ = load_model_from_checkpoint(ckpt)
    theirs = auto_model.from_pretrained(str(out), dtype=torch.float32).eval()
    stored = EXPORT_DTYPES[read_json(Path(out) / "config.json")["torch_dtype"]]
    # ours with its weights rounded as the export stored them: the comparison isolates the architecture mapping
    ours.load_state_dict({k: v.to(stored).float() for k, v in ours.state_dict().items()})
    length = min(seq_len, cfg.model.max_position_embeddings)
    ids = torch.randint(tokenizer.first_ordinary_id, cfg.model.vocab_size, (rows, length),
                        generator=torch.Generator().manual_seed(0))
    return (ours.eval()(ids).logits - theirs(ids).logits).abs().max().item()
