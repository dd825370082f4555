"""The configuration tree: dataclasses are the single source of truth; TOML presets and `--set` only fill them.

    cfg = load_config("configs/tiny.toml", ["optim.lr=3e-4", "train.max_steps=100"])

Every value is checked before any work starts, and errors name the key (`model.hidden_size ...`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path

from minipretrain.data.sources import KNOWN_SUFFIXES
from minipretrain.errors import ConfigError

DTYPE_NAMES = ("auto", "float32", "bfloat16", "float16")  # train.dtype and --dtype; torch dtypes in precision.py
LOGGERS = ("jsonl", "tensorboard", "wandb", "swanlab")  # train.loggers; train/trackers.py starts them
ACTIVATION_CHECKPOINTING = ("none", "selective", "full")  # train.activation_checkpointing; parallel/ applies it
PP_SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b")  # parallel.pp_schedule; parallel/pipeline.py runs them


def check_device_name(name: str, key: str = "train.device") -> None:
    """auto, cpu, cuda, cuda:N or mps (`key` names the setting in the error)."""
    kind, colon, index = name.partition(":")
    if kind not in ("auto", "cpu", "cuda", "mps") or (colon and (kind != "cuda" or not index.isdigit())):
        raise ConfigError(f"{key}={name}: unknown device (auto, cpu, cuda, cuda:N or mps)")

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


@dataclass
class ModelConfig:
    vocab_size: int = 6400
    hidden_size: int = 512
    num_hidden_layers: int = 8
    num_attention_heads: int = 8
    num_key_value_heads: int = 2
    intermediate_size: int | None = None  # None: 64 * ceil(8 * hidden / 3 / 64), MiniMind's SwiGLU width
    max_position_embeddings: int = 32768
    rope_theta: float = 1e6
    rms_norm_eps: float = 1e-5
    dropout: float = 0.0
    qk_norm: bool = False  # per-head RMSNorm on q and k (MiniMind-3 / Qwen3 style)
    attention: str = "causal"  # causal | bidirectional (masked LM: train.objective=mlm sets it)
    initializer_range: float = 0.02
    # Mixture of experts (moe.py): every layer's SwiGLU becomes num_experts routed experts (each token uses the
    # top num_experts_per_tok) plus num_shared_experts that every token uses.
    moe: bool = False
    num_experts: int = 4
    num_experts_per_tok: int = 2
    num_shared_experts: int = 0
    moe_intermediate_size: int | None = None  # None: intermediate_size
    norm_topk_prob: bool = True  # renormalise the top-k router probabilities to sum to 1 (top-1: weight 1)
    router_aux_loss_coef: float = 0.01  # weight of the load-balancing loss (0: off)
    seq_aux: bool = True  # balancing loss per sequence, averaged (MiniMind2); false: over the whole batch
    router_bias_update_rate: float = 0.0  # > 0: DeepSeek-V3 auxiliary-loss-free balancing, bias step per update

    def __post_init__(self):
        if self.intermediate_size is None and isinstance(self.hidden_size, int):
            self.intermediate_size = 64 * math.ceil(8 * self.hidden_size / 3 / 64)
        if self.moe_intermediate_size is None:
            self.moe_intermediate_size = self.intermediate_size

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclass
class SourceConfig:
    """One source of a weighted mixture: `data.sources = [{path = "en.jsonl", weight = 0.7}, ...]`."""
    path: str
    weight: float = 1.0
    name: str | None = None  # for per-source logs; default: the file or directory name


@dataclass
class DataConfig:
    path: str = "builtin:python-docs"  # a file, directory, glob, prepared directory, or `builtin:python-docs`
    sources: list[SourceConfig] = field(default_factory=list)  # a weighted mixture instead of `path`
    text_field: str = "text"  # the JSONL field holding the document
    layout: str = "packed"  # packed: documents joined by eos, no padding | padded: MiniMind's one document per row
    val_fraction: float = 0.01  # share of documents held out for validation (ignored when val_path is set)
    val_path: str | None = None
    tokenizer: str | None = None  # a directory with tokenizer.json; None: train one on the training data
    skip_bad_lines: bool = False  # skip (and count) malformed lines instead of stopping with an error
    document_mask: bool = False  # packed rows: attend only within each document, positions restart per document
    prepare_workers: int = 0  # processes that tokenize raw sources into the run directory; 0: one per CPU core

    def mixture(self) -> list[SourceConfig]:
        """The sources to train on, each with a unique name: `sources`, or `path` as a single source."""
        sources = self.sources or [SourceConfig(self.path)]
        named, seen = [], set()
        for source in sources:
            name = source.name or source_name(source.path)
            base, n = name, 1
            while name in seen:
                n += 1
                name = f"{base}_{n}"
            seen.add(name)
            named.append(SourceConfig(source.path, source.weight, name))
        return named


def source_name(path: str) -> str:
    """A short label for a data path: its file or directory name without suffix (`builtin-python-docs` for
    the built-in corpus)."""
    if path.startswith("builtin:"):
        return path.replace(":", "-")
    name = Path(path.rstrip("/\\")).name
    for suffix in KNOWN_SUFFIXES:
        name = name.removesuffix(suffix)
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name) or "data"


@dataclass
class OptimConfig:
    name: str = "adamw"  # adamw | muon: Muon for the blocks' matrices, AdamW for the rest (train/optim.py)
    lr: float = 5e-4
    min_lr: float = 5e-5
    warmup_steps: int = 0
    schedule: str = "cosine"  # cosine | minimind | wsd
    decay_fraction: float = 0.2  # wsd: the final share of steps spent decaying to min_lr
    decay_steps: int | None = None  # wsd: decay over this many final steps instead (a branch's decay phase)
    weight_decay: float = 0.1
    grad_clip: float = 1.0  # 0 disables clipping (the norm is still logged)
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    muon_lr: float | None = None  # muon: its peak learning rate; None: optim.lr (with muon_adjust_lr's RMS matching)
    muon_momentum: float = 0.95
    muon_weight_decay: float | None = None  # None: optim.weight_decay
    # torch.optim.Muon's adjust_lr_fn: match_rms_adamw (update RMS of AdamW's, Moonlight: AdamW's lr is a safe start;
    # benchmarks/quality.py found 4-8x better) | original (Keller Jordan's sqrt(max(1, rows / cols)))
    muon_adjust_lr: str = "match_rms_adamw"


@dataclass
class TrainConfig:
    max_steps: int = 1000
    # The run's length in passes over the training data instead: max_steps is derived from the data's rows, the
    # global batch and this, once the data is known (a mixture's epoch is a pass over all its sources' rows).
    epochs: float | None = None
    batch_size: int = 4  # per device
    seq_len: int = 512
    grad_accum: int = 1
    seed: int = 1337
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    dtype: str = "auto"  # auto (bf16 on GPUs and on CPUs with native bf16) | float32 | bfloat16 | float16 (CUDA)
    # deterministic kernels only (torch.use_deterministic_algorithms): bitwise resume on GPUs
    deterministic: bool = False
    compile: bool | None = None  # torch.compile each block; None: on CUDA, not elsewhere
    # Recompute transformer blocks in backward instead of keeping their activations (parallel.py): none | full
    # (every block) | selective (every second block); less memory for about one more forward of those blocks.
    activation_checkpointing: str = "none"
    log_every: int = 1
    eval_every: int = 100  # 0: only at the end
    eval_batches: int = 20
    sample_every: int = 0  # 0: only at the end
    sample_prompt: str = ""
    sample_tokens: int = 64
    save_every: int = 500  # 0: only at the end
    save_every_minutes: float = 0.0  # also save when this much wall-clock time passed since the last save (0: off)
    keep_checkpoints: int = 3
    async_save: bool = False  # write checkpoints in the background while training goes on (at most one in flight)
    checkpoint_mirror: str | None = None  # a second directory each completed checkpoint is copied to
    objective: str = "clm"  # clm: causal LM | fim: fill-in-the-middle | mlm: masked LM (data/objectives.py)
    fim_rate: float = 0.5  # fim: share of documents rearranged into prefix / suffix / middle
    fim_spm_rate: float = 0.5  # fim: share of those laid out suffix-prefix-middle (SPM) instead of PSM
    mlm_probability: float = 0.15  # mlm: share of tokens chosen for prediction (80% masked, 10% random, 10% kept)
    # Continual pretraining: a fresh run (new optimizer, schedule, step 0) starting from a checkpoint's weights
    # (a run, a checkpoint directory, or what `minipretrain import` wrote); the model config must match.
    init_from: str | None = None
    # Experiment trackers (train/trackers.py): jsonl (metrics.jsonl) is always on; add tensorboard, wandb, swanlab.
    loggers: list[str] = field(default_factory=lambda: ["jsonl"])
    project: str = "minipretrain"  # the wandb / swanlab project
    run_name: str | None = None  # None: the run directory's name
    tracker_mode: str | None = None  # wandb / swanlab: online | offline; None: WANDB_MODE / SWANLAB_MODE, else online


@dataclass
class GuardConfig:
    """The loss-spike guard (train/stability.py): what makes a step bad, and what is done about it."""
    action: str = "skip"  # skip: drop the bad step's update | rollback: restore the last snapshot | stop: end the run
    loss_factor: float = 3.0  # a loss above this times the running mean is a spike (0: off)
    loss_z: float = 0.0  # a loss this many standard deviations above the running mean is a spike (0: off)
    grad_norm_factor: float = 10.0  # a gradient norm above this times the running median is a spike (0: off)
    window: int = 100  # steps of history behind the running statistics, and for counting spikes
    min_step: int | None = None  # statistical checks start after this step; None: optim.warmup_steps
    max_spikes: int = 3  # rollback: this many spikes within guard.window steps restore the last snapshot
    lr_factor: float = 1.0  # rollback: the learning rate is scaled by this ...
    lr_steps: int = 100  # ... for this many steps after a rollback
    max_rollbacks: int = 5  # rollback: more than this many end the run (the instability is not passing)


@dataclass
class ParallelConfig:
    """How the processes started by torchrun share the work; a single process ignores it."""
    mode: str = "ddp"  # ddp: replicate the model, all-reduce gradients | fsdp: shard parameters, gradients, optimizer
    tensor_parallel: int = 1  # ranks splitting each layer's heads and SwiGLU width; the rest are data parallel
    pipeline_parallel: int = 1  # ranks holding successive stages of the blocks (parallel/pipeline.py)
    pp_schedule: str = "1f1b"  # gpipe | 1f1b | interleaved_1f1b
    pp_stages_per_rank: int | None = None  # stages each rank holds: 1; interleaved_1f1b: 2 unless set
    pp_microbatches: int | None = None  # micro-batches in flight per step; None: train.grad_accum
    reshard_after_forward: bool = True  # fsdp: free gathered parameters after forward (ZeRO-3); false: ZeRO-2-like
    cpu_offload: bool = False  # fsdp on CUDA: keep sharded parameters, gradients and optimizer state in CPU memory
    backend: str = "auto"  # auto (nccl on CUDA, gloo on CPU) | nccl | gloo
    timeout_s: int = 1800  # a collective waiting longer than this fails the job (e.g. a rank that hangs)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    guard: GuardConfig = field(default_factory=GuardConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_toml(self) -> str:
        lines = []
        for section, values in self.to_dict().items():
            lines.append(f"[{section}]")
            for key, value in values.items():
                if value is not None:  # TOML has no null: an absent key means the default
                    lines.append(f"{key} = {toml_value(value)}")
            lines.append("")
        return "\n".join(lines)


_SECTION_CLASSES = {"model": ModelConfig, "data": DataConfig, "optim": OptimConfig, "train": TrainConfig,
                    "guard": GuardConfig, "parallel": ParallelConfig}


def toml_value(value) -> str:
    if isinstance(value, dict):  # an inline table (mixture sources); None means the default
        return "{" + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items() if v is not None) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    # A JSON string is a TOML basic string, except that TOML also forbids a raw DEL character.
    return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")


def _parse_value(text: str):
    """`--set` values are TOML literals (3e-4, true, "x"); anything else is taken as a plain string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _check_sources(key: str, value) -> list[SourceConfig]:
    if not isinstance(value, list):
        raise ConfigError(f"{key}: expected a list of tables like [{{path = \"a.jsonl\", weight = 0.7}}], "
                          f"got {value!r}")
    hints = typing.get_type_hints(SourceConfig)
    sources = []
    for i, item in enumerate(value):
        if not isinstance(item, dict) or "path" not in item:
            raise ConfigError(f"{key}[{i}]: expected a table with a path, like {{path = \"a.jsonl\", weight = 0.7}}")
        unknown = set(item) - set(hints)
        if unknown:
            raise ConfigError(f"{key}[{i}]: unknown key {sorted(unknown)[0]} (known: {', '.join(hints)})")
        sources.append(SourceConfig(**{k: _check_type(f"{key}[{i}].{k}", v, hints[k]) for k, v in item.items()}))
    return sources


def _check_type(key: str, value, annotation):
    if annotation == list[SourceConfig]:
        return _check_sources(key, value)
    if annotation == list[str]:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{key}: expected a list of strings like [\"jsonl\", \"tensorboard\"], got {value!r}")
        return value
    hints = typing.get_args(annotation) or (annotation,)
    allowed = [h for h in hints if h is not type(None)]
    if value is None and len(allowed) < len(hints):
        return value
    for kind in allowed:
        if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if kind is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if kind in (str, bool) and isinstance(value, kind):
            return value
    names = " or ".join(k.__name__ for k in allowed)
    raise ConfigError(f"{key}: expected {names}, got {value!r} ({type(value).__name__})")


def config_from_dict(raw: dict, source: str = "config") -> Config:
    sections = {}
    for section, values in raw.items():
        cls = _SECTION_CLASSES.get(section)
        if cls is None:
            raise ConfigError(f"{source}: unknown section [{section}] (known: {', '.join(_SECTION_CLASSES)})")
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: [{section}] must be a table of key = value")
        hints = typing.get_type_hints(cls)
        checked = {}
        for key, value in values.items():
            if key not in hints:
                raise ConfigError(
                    f"{source}: unknown key {section}.{key} (known: {', '.join(hints)})"
                )
            checked[key] = _check_type(f"{section}.{key}", value, hints[key])
        sections[section] = cls(**checked)
    if {"epochs", "max_steps"} <= raw.get("train", {}).keys():
        raise ConfigError(f"{source}: train.epochs and train.max_steps both set: give the run's length one way")
    cfg = Config(**sections)
    if cfg.train.objective == "mlm" and "attention" not in raw.get("model", {}):
        cfg.model.attention = "bidirectional"  # the model's own setting, so config.toml and every tool see it
    validate(cfg)
    return cfg


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults, then the TOML file, then each `section.key=value` override; validated once at the end."""
    raw: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} not found")
        try:
            raw = tomllib.loads(path.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: not valid TOML: {e}") from None
    lengths = {"epochs", "max_steps"}  # two ways to give a run's length: an override of one replaces the file's other
    overridden = set()
    for item in overrides:
        key, sep, text = item.partition("=")
        section, dot, name = key.strip().partition(".")
        if not sep or not dot or not name or not section:
            raise ConfigError(f"--set {item!r}: expected section.key=value, e.g. optim.lr=3e-4")
        if section == "train" and name in lengths:
            overridden.add(name)
        raw.setdefault(section, {})[name] = _parse_value(text.strip())
    if len(overridden) == 1:
        raw["train"].pop((lengths - overridden).pop(), None)
    return config_from_dict(raw, source=str(path) if path else "config")


def _require(condition: bool, key: str, message: str):
    if not condition:
        raise ConfigError(f"{key}: {message}")


def validate(cfg: Config) -> None:
    m, d, o, t, p, g = cfg.model, cfg.data, cfg.optim, cfg.train, cfg.parallel, cfg.guard
    positive = {
        "model": ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                  "intermediate_size", "max_position_embeddings", "rope_theta", "rms_norm_eps", "initializer_range"),
        "train": ("max_steps", "batch_size", "seq_len", "grad_accum", "log_every", "eval_batches",
                  "keep_checkpoints"),
    }
    for section, keys in positive.items():
        for key in keys:
            value = getattr(getattr(cfg, section), key)
            _require(value > 0, f"{section}.{key}", f"must be positive, got {value}")
    _require(t.epochs is None or t.epochs > 0, "train.epochs", f"must be positive, got {t.epochs}")
    for key in ("eval_every", "sample_every", "save_every", "sample_tokens"):
        _require(getattr(t, key) >= 0, f"train.{key}", "must be >= 0 (0 means only at the end)")
    _require(m.hidden_size % m.num_attention_heads == 0, "model.hidden_size",
             f"{m.hidden_size} is not divisible by model.num_attention_heads={m.num_attention_heads}")
    _require(m.num_attention_heads % m.num_key_value_heads == 0, "model.num_attention_heads",
             f"{m.num_attention_heads} is not divisible by model.num_key_value_heads={m.num_key_value_heads}")
    _require(m.head_dim % 2 == 0, "model.hidden_size",
             f"head dim {m.head_dim} (hidden_size / num_attention_heads) must be even for rotary embeddings")
    _require(0 <= m.dropout < 1, "model.dropout", f"must be in [0, 1), got {m.dropout}")
    _require(t.seq_len <= m.max_position_embeddings, "train.seq_len",
             f"{t.seq_len} exceeds model.max_position_embeddings={m.max_position_embeddings}")
    if m.moe:
        _require(m.num_experts >= 1, "model.num_experts", f"must be at least 1, got {m.num_experts}")
        _require(1 <= m.num_experts_per_tok <= m.num_experts, "model.num_experts_per_tok",
                 f"must be in [1, model.num_experts={m.num_experts}], got {m.num_experts_per_tok}")
        _require(m.num_shared_experts >= 0, "model.num_shared_experts", f"must be >= 0, got {m.num_shared_experts}")
        _require(m.moe_intermediate_size > 0, "model.moe_intermediate_size",
                 f"must be positive, got {m.moe_intermediate_size}")
        _require(m.router_aux_loss_coef >= 0, "model.router_aux_loss_coef",
                 f"must be >= 0 (0 = no balancing loss), got {m.router_aux_loss_coef}")
        _require(m.router_bias_update_rate >= 0, "model.router_bias_update_rate",
                 f"must be >= 0 (0 = no bias balancing), got {m.router_bias_update_rate}")
    _require(m.attention in ("causal", "bidirectional"), "model.attention",
             f"unknown attention {m.attention!r} (causal or bidirectional)")
    _require(t.objective in ("clm", "fim", "mlm"), "train.objective",
             f"unknown objective {t.objective!r} (clm, fim or mlm)")
    wanted = "bidirectional" if t.objective == "mlm" else "causal"
    _require(m.attention == wanted, "model.attention",
             f"train.objective={t.objective} needs {wanted} attention, got {m.attention} "
             f"(leave model.attention unset: the objective sets it)")
    for key in ("fim_rate", "fim_spm_rate"):
        _require(0 <= getattr(t, key) <= 1, f"train.{key}", f"must be in [0, 1], got {getattr(t, key)}")
    _require(0 < t.mlm_probability < 1, "train.mlm_probability", f"must be in (0, 1), got {t.mlm_probability}")
    for name in t.loggers:
        _require(name in LOGGERS, "train.loggers", f"unknown logger {name!r} ({', '.join(LOGGERS)})")
    _require(t.tracker_mode in (None, "online", "offline"), "train.tracker_mode",
             f"unknown mode {t.tracker_mode!r} (online or offline)")
    _require(bool(t.project), "train.project", "must not be empty")
    check_device_name(t.device)
    _require(t.dtype in DTYPE_NAMES, "train.dtype", f"unknown dtype {t.dtype!r} ({', '.join(DTYPE_NAMES)})")
    _require(t.activation_checkpointing in ACTIVATION_CHECKPOINTING, "train.activation_checkpointing",
             f"unknown mode {t.activation_checkpointing!r} (none, selective or full)")
    _require(o.lr > 0, "optim.lr", f"must be positive, got {o.lr}")
    _require(0 <= o.min_lr <= o.lr, "optim.min_lr", f"must be in [0, optim.lr={o.lr}], got {o.min_lr}")
    _require(o.warmup_steps >= 0, "optim.warmup_steps", f"must be >= 0, got {o.warmup_steps}")
    _require(o.schedule in ("cosine", "minimind", "wsd"), "optim.schedule",
             f"unknown schedule {o.schedule!r} (cosine, minimind or wsd)")
    _require(0 < o.decay_fraction <= 1, "optim.decay_fraction", f"must be in (0, 1], got {o.decay_fraction}")
    _require(o.decay_steps is None or o.decay_steps >= 1, "optim.decay_steps",
             f"must be at least 1 (or unset: optim.decay_fraction), got {o.decay_steps}")
    _require(o.decay_steps is None or o.schedule == "wsd", "optim.decay_steps",
             f"sets the decay of optim.schedule=wsd, not {o.schedule}")
    _require(o.weight_decay >= 0, "optim.weight_decay", f"must be >= 0, got {o.weight_decay}")
    _require(o.grad_clip >= 0, "optim.grad_clip", f"must be >= 0 (0 disables clipping), got {o.grad_clip}")
    for key in ("beta1", "beta2"):
        _require(0 <= getattr(o, key) < 1, f"optim.{key}", f"must be in [0, 1), got {getattr(o, key)}")
    _require(o.eps > 0, "optim.eps", f"must be positive, got {o.eps}")
    _require(o.name in ("adamw", "muon"), "optim.name", f"unknown optimizer {o.name!r} (adamw or muon)")
    _require(o.muon_lr is None or o.muon_lr > 0, "optim.muon_lr", f"must be positive, got {o.muon_lr}")
    _require(0 <= o.muon_momentum < 1, "optim.muon_momentum", f"must be in [0, 1), got {o.muon_momentum}")
    _require(o.muon_weight_decay is None or o.muon_weight_decay >= 0, "optim.muon_weight_decay",
             f"must be >= 0, got {o.muon_weight_decay}")
    _require(o.muon_adjust_lr in ("match_rms_adamw", "original"), "optim.muon_adjust_lr",
             f"unknown adjustment {o.muon_adjust_lr!r} (match_rms_adamw or original)")
    _require(d.layout in ("packed", "padded"), "data.layout", f"unknown layout {d.layout!r} (packed or padded)")
    _require(0 <= d.val_fraction < 1, "data.val_fraction", f"must be in [0, 1), got {d.val_fraction}")
    _require(bool(d.path), "data.path", "must name a file, directory, glob or builtin:python-docs")
    _require(bool(d.text_field), "data.text_field", "must not be empty")
    _require(d.prepare_workers >= 0, "data.prepare_workers",
             f"must be >= 0 (0: one per CPU core), got {d.prepare_workers}")
    _require(not (d.document_mask and d.layout == "padded"), "data.document_mask",
             "needs data.layout=packed (a padded row already holds a single document)")
    _require(not (d.sources and d.path != DataConfig.path), "data.sources",
             "set either data.path (one source) or data.sources (a mixture), not both")
    for i, source in enumerate(d.sources):
        _require(bool(source.path), f"data.sources[{i}].path", "must name a file, directory, glob or builtin corpus")
        _require(source.weight > 0, f"data.sources[{i}].weight", f"must be positive, got {source.weight}")
    _require(t.save_every_minutes >= 0, "train.save_every_minutes",
             f"must be >= 0 (0: off), got {t.save_every_minutes}")
    _require(t.checkpoint_mirror is None or bool(t.checkpoint_mirror), "train.checkpoint_mirror",
             "must name a directory (leave it unset for no mirror)")
    _require(g.action in ("skip", "rollback", "stop"), "guard.action",
             f"unknown action {g.action!r} (skip, rollback or stop)")
    for key in ("loss_factor", "loss_z", "grad_norm_factor"):
        value = getattr(g, key)
        _require(value == 0 or value > 1, f"guard.{key}", f"must be above 1 (or 0: off), got {value}")
    for key in ("window", "max_spikes"):
        _require(getattr(g, key) >= 1, f"guard.{key}", f"must be at least 1, got {getattr(g, key)}")
    _require(g.max_spikes <= g.window, "guard.max_spikes",
             f"{g.max_spikes} spikes cannot fit in guard.window={g.window}")
    _require(g.min_step is None or g.min_step >= 0, "guard.min_step", f"must be >= 0, got {g.min_step}")
    _require(0 < g.lr_factor <= 1, "guard.lr_factor", f"must be in (0, 1], got {g.lr_factor}")
    for key in ("lr_steps", "max_rollbacks"):
        _require(getattr(g, key) >= 0, f"guard.{key}", f"must be >= 0, got {getattr(g, key)}")
    _require(p.mode in ("ddp", "fsdp"), "parallel.mode", f"unknown mode {p.mode!r} (ddp or fsdp)")
    _require(p.backend in ("auto", "nccl", "gloo"), "parallel.backend",
             f"unknown backend {p.backend!r} (auto, nccl or gloo)")
    _require(p.timeout_s > 0, "parallel.timeout_s", f"must be positive, got {p.timeout_s}")
    _require(not p.cpu_offload or p.mode == "fsdp", "parallel.cpu_offload",
             "offloads FSDP shards: it needs parallel.mode=fsdp")
    _require(p.tensor_parallel >= 1, "parallel.tensor_parallel", f"must be >= 1, got {p.tensor_parallel}")
    _require(p.pipeline_parallel >= 1, "parallel.pipeline_parallel", f"must be >= 1, got {p.pipeline_parallel}")
    _require(p.pp_schedule in PP_SCHEDULES, "parallel.pp_schedule",
             f"unknown schedule {p.pp_schedule!r} ({', '.join(PP_SCHEDULES)})")
    for key in ("pp_stages_per_rank", "pp_microbatches"):
        value = getattr(p, key)
        _require(value is None or value >= 1, f"parallel.{key}", f"must be >= 1 (or unset: the default), got {value}")
    if p.pipeline_parallel > 1:
        validate_pipeline(cfg)
    for key, value in (("model.num_key_value_heads", m.num_key_value_heads),
                       ("model.intermediate_size", m.intermediate_size),
                       ("model.moe_intermediate_size", m.moe_intermediate_size if m.moe else 0)):
        _require(value % p.tensor_parallel == 0, key,
                 f"{value} is not divisible by parallel.tensor_parallel={p.tensor_parallel} "
                 "(each rank takes an equal slice)")



def pipeline_shape(p: ParallelConfig, grad_accum: int) -> tuple[int, int]:
    """(stages per rank, micro-batches per step) of a pipeline-parallel run, with their defaults filled in."""
    per_rank = p.pp_stages_per_rank if p.pp_stages_per_rank is not None else 2 if p.pp_schedule == "interleaved_1f1b" \
        else 1
    return per_rank, p.pp_microbatches if p.pp_microbatches is not None else grad_accum


def validate_pipeline(cfg: Config) -> None:
    """What the torch.distributed.pipelining schedules need, checked before any work."""
    p, t, m = cfg.parallel, cfg.train, cfg.model
    per_rank, micro = pipeline_shape(p, t.grad_accum)
    if p.pp_schedule == "interleaved_1f1b":
        _require(per_rank >= 2, "parallel.pp_stages_per_rank",
                 "interleaved_1f1b needs at least 2 stages per rank (with 1, use pp_schedule=1f1b)")
    else:
        _require(per_rank == 1, "parallel.pp_stages_per_rank",
                 f"{p.pp_schedule} runs one stage per rank (several: pp_schedule=interleaved_1f1b)")
    stages = p.pipeline_parallel * per_rank
    _require(m.num_hidden_layers >= stages, "parallel.pipeline_parallel",
             f"{stages} stages ({p.pipeline_parallel} ranks x {per_rank}) need at least as many layers, the model "
             f"has model.num_hidden_layers={m.num_hidden_layers}")
    rows = t.batch_size * t.grad_accum
    _require(rows % micro == 0, "parallel.pp_microbatches",
             f"{micro} micro-batches do not divide the {rows} rows of a step (train.batch_size x train.grad_accum)")
    if p.pp_schedule == "1f1b":
        _require(micro >= p.pipeline_parallel, "parallel.pp_microbatches",
                 f"1f1b needs at least one micro-batch per stage: {micro} < {p.pipeline_parallel} (raise "
                 "train.grad_accum or parallel.pp_microbatches)")
    if p.pp_schedule == "interleaved_1f1b":
        rounds = max(1, micro // p.pipeline_parallel)
        _require(micro % rounds == 0, "parallel.pp_microbatches",
                 f"interleaved_1f1b needs a multiple of {rounds} micro-batches, got {micro}")
    _require(not m.moe, "model.moe",
             "a mixture of experts does not run under pipeline parallelism here (its balancing loss is summed over "
             "all layers): use data or tensor parallelism")
    _require(not p.cpu_offload, "parallel.cpu_offload", "does not combine with pipeline parallelism")
