"""The scaling planner behind `minipretrain plan`: what a config costs before it runs.

    plan = make_plan(load_config("configs/minimind2-26m.toml"), PlanOptions(devices=8, gpu="H100", gpu_hours=100))
    print(format_plan(plan))        # or json.dumps(plan)

Parameters are counted on the real model built on the `meta` device (no memory, exact); FLOPs per token are
metrics.flops_per_token (6*N + 12*L*H*Q*T); compute-optimal sizes follow Chinchilla (D = 20*N, C = 6*N*D); memory
is this trainer's own accounting (float32 weights, gradients and optimizer state, bf16 autocast activations), per
component and per sharding strategy. `measure` runs real training steps in a fresh process to calibrate tokens/s
and peak memory. docs/planning.md derives every formula.
"""

from __future__ import annotations

import functools
import math
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from typing import NamedTuple

import torch

from minipretrain.config import Config, ModelConfig
from minipretrain.errors import ConfigError, DataError, UserError
from minipretrain.train.metrics import FLOPS_FORMULA, GPU_PEAK_TFLOPS, flops_per_token, gpu_peak_tflops
from minipretrain.train.schedule import steps_for_epochs

TOKENS_PER_PARAMETER = 20  # Chinchilla (Hoffmann et al. 2022): compute-optimal D ~ 20 N
FP32 = 4  # bytes: weights, gradients and both AdamW moments stay float32 (precision.py)
GIB = 2**30


@dataclass
class PlanOptions:
    """Everything `minipretrain plan` takes besides the config; validate() names the flag that is wrong."""
    devices: int = 1
    budget_flops: float | None = None
    gpu_hours: float | None = None
    gpu: str | None = None
    peak_tflops: float | None = None
    mfu: float = 0.4
    data: str | None = None
    sample_mb: float = 2.0
    tokens_per_s: float | None = None
    gpu_memory_gib: float | None = None
    pipeline_stages: int | None = None
    microbatches: int | None = None
    measure: bool = False
    measure_steps: int = 3

    def validate(self) -> None:
        def require(ok: bool, message: str) -> None:
            if not ok:
                raise ConfigError(message)

        require(self.devices >= 1, f"--devices must be at least 1, got {self.devices}")
        for flag, value in (("--budget-flops", self.budget_flops), ("--gpu-hours", self.gpu_hours),
                            ("--peak-tflops", self.peak_tflops), ("--tokens-per-s", self.tokens_per_s),
                            ("--gpu-memory-gib", self.gpu_memory_gib), ("--sample-mb", self.sample_mb)):
            require(value is None or (math.isfinite(value) and value > 0),
                    f"{flag} must be a positive number, got {value}")
        require(0 < self.mfu <= 1, f"--mfu must be in (0, 1] (a share of the peak, e.g. 0.4), got {self.mfu}")
        require(self.budget_flops is None or self.gpu_hours is None,
                "--budget-flops and --gpu-hours exclude each other: give the budget one way")
        if self.gpu is not None and self.peak_tflops is None:
            known = ", ".join(name for name, _, _ in GPU_PEAK_TFLOPS)
            require(gpu_peak_tflops(self.gpu, torch.bfloat16) is not None,
                    f"--gpu {self.gpu}: unknown GPU (known: {known}); pass --peak-tflops with its dense peak")
        require(self.gpu_hours is None or self.gpu is not None or self.peak_tflops is not None,
                "--gpu-hours needs the GPU's peak: pass --gpu NAME (e.g. H100) or --peak-tflops")
        if self.data is not None:
            check_data(self.data)
        require((self.pipeline_stages is None) == (self.microbatches is None),
                "--pipeline-stages and --microbatches go together: give both, e.g. --pipeline-stages 4 "
                "--microbatches 16")
        for flag, value in (("--pipeline-stages", self.pipeline_stages), ("--microbatches", self.microbatches)):
            require(value is None or value >= 1, f"{flag} must be at least 1, got {value}")
        require(self.measure_steps >= 1, f"--measure-steps must be at least 1, got {self.measure_steps}")
        require(self.tokens_per_s is None or not self.measure,
                "--tokens-per-s and --measure exclude each other: give the throughput or measure it")


def check_data(path: str) -> None:
    """--data names a prepared directory, the built-in corpus, or files that exist (a glob matching some)."""
    from minipretrain.data.shards import is_prepared
    from minipretrain.data.sources import BUILTIN_PYTHON_DOCS, resolve_files

    if path == BUILTIN_PYTHON_DOCS or is_prepared(path):
        return
    if path.startswith("builtin:"):
        raise ConfigError(f"--data {path}: unknown built-in corpus (available: {BUILTIN_PYTHON_DOCS})")
    try:
        resolve_files(path)
    except DataError as e:
        raise ConfigError(f"--data: {e}") from None


# ------------------------------------------------------------------------------------------------ parameters


@dataclass
class ParameterCounts:
    total: int  # the tied embedding / lm_head matrix counted once
    embedding: int  # vocab x hidden (also the output head: tied)
    non_embedding: int  # total - embedding (Kaplan et al.'s N)
    active: int  # per token: total minus the routed experts outside the top-k (= total for a dense model)
    matrices: int  # weights of nn.Linear layers (lm_head included): what bf16 autocast copies
    per_layer: int  # one decoder block
    outside_layers: int  # embedding + final norm (FSDP's root unit)
    muon_matrices: int  # the block matrices optim.name=muon trains with Muon: one momentum buffer, not two moments


def count_parameters(model_cfg: ModelConfig) -> ParameterCounts:
    """Counts from the real MiniMind built on the meta device: exact, and no memory is allocated."""
    from minipretrain.model import MiniMind
    from minipretrain.train.optim import is_muon_parameter

    with torch.device("meta"):
        model = MiniMind(model_cfg)
    total = model.num_parameters()
    embedding = model.embed_tokens.weight.numel()
    linear_weights = {id(m.weight): m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear)}
    per_layer = sum(p.numel() for p in model.layers[0].parameters())
    muon_matrices = sum(p.numel() for name, p in model.named_parameters() if is_muon_parameter(name, p))
    return ParameterCounts(total, embedding, total - embedding, model.num_active_parameters(),
                           sum(linear_weights.values()), per_layer, total - per_layer * len(model.layers),
                           muon_matrices)


# ------------------------------------------------------------------------------------------- compute budget


def chinchilla_tokens(parameters: int) -> int:
    return TOKENS_PER_PARAMETER * parameters


def compute_optimal(budget_flops: float) -> tuple[float, float]:
    """(N, D) minimising loss for C FLOPs under C = 6*N*D and D = 20*N: N = sqrt(C / 120), D = 20*N."""
    n = math.sqrt(budget_flops / (6 * TOKENS_PER_PARAMETER))
    return n, TOKENS_PER_PARAMETER * n


def gpu_hours_to_flops(gpu_hours: float, peak_tflops: float, mfu: float) -> float:
    """GPU-hours are summed over GPUs: each delivers peak * mfu FLOP/s."""
    return gpu_hours * 3600 * peak_tflops * 1e12 * mfu


def tokens_per_step(batch_size: int, devices: int, grad_accum: int, seq_len: int) -> int:
    return batch_size * devices * grad_accum * seq_len


def pipeline_bubble(stages: int, microbatches: int, per_rank: int = 1) -> float:
    """The idle share of a GPipe / 1F1B schedule, (p - 1) / (m + p - 1), and of interleaved 1F1B with v stages
    per rank, (p - 1) / (v*m + p - 1) (Narayanan et al. 2021); p: pipeline ranks, m: micro-batches."""
    return (stages - 1) / (per_rank * microbatches + stages - 1)


# ---------------------------------------------------------------------------------------------------- memory


def activation_bytes_per_token(m: ModelConfig, act_bytes: int) -> tuple[int, int]:
    """(bytes one decoder block saves for backward per token, bytes of the head per token at its peak): what
    autograd keeps in this model, tensor by tensor (the method of Korthikanti et al. 2022, "Reducing Activation
    Recomputation in Large Transformer Models", applied to RMSNorm, GQA, RoPE, SwiGLU and fused attention; no dropout
    masks since dropout is 0, and no seq x seq scores: SDPA's flash kernels keep only the output and log-sum-exp).

    act_bytes: 2 under bf16/fp16 autocast, 4 in float32. The residual stream stays float32 either way (the
    embedding's output is float32 and residual additions promote). Under autocast every Linear casts its input
    itself, so q/k/v keep three bf16 copies of the normed input and gate/up two; in float32 they share one."""
    a, h, i = act_bytes, m.hidden_size, m.intermediate_size
    heads, kv_width = m.num_attention_heads, m.num_key_value_heads * m.head_dim
    casts_attn, casts_mlp = (3, 2) if a < FP32 else (1, 1)
    rms_norm = 2 * FP32 * h + FP32  # its float32 input, x * rstd (for the weight's gradient) and rstd
    attention = (casts_attn * a * h  # the normed input of q/k/v
                 + a * (h + 2 * kv_width)  # q, k, v after RoPE (the RoPE products keep only cos / sin)
                 + a * h + FP32 * heads)  # attention output (o_proj's input too: a view) and its log-sum-exp
    if m.qk_norm:  # RMSNorm upcasts q and k: float32 input and x * rstd, an rstd per head; and the attention
        # output, no longer laid out as o_proj wants it, is copied for o_proj
        attention += 2 * FP32 * (h + kv_width) + FP32 * (heads + m.num_key_value_heads) + a * h
    # One SwiGLU: gate/up inputs, then gate, up, silu(gate) and down's input, each as wide as the SwiGLU.
    swiglu = casts_mlp * a * h + 4 * a * (m.moe_intermediate_size if m.moe else i)
    mlp = swiglu
    if m.moe:
        mlp = (a * h + FP32 * m.num_experts  # router input and softmax output
               + m.num_experts_per_tok * (swiglu + a * h)  # each routed slot, plus its output kept for the weight
               + m.num_shared_experts * swiglu)
    # The head: the final norm, lm_head's input, the logits (kept in the output) and, at the start of backward,
    # three float32 vocab-wide tensors: the log-softmax output, the loss's gradient and the log-softmax's gradient.
    head = rms_norm + a * h + (a + 3 * FP32) * m.vocab_size
    return 2 * rms_norm + attention + mlp, head


def rope_table_bytes(m: ModelConfig, seq_len: int, act_bytes: int) -> int:
    """Per layer and row position, not per token: under autocast cos and sin are cast to bf16 for q and for k
    (four seq x head_dim tables that backward keeps); in float32 they are the model's own buffers."""
    return 4 * seq_len * m.head_dim * act_bytes if act_bytes < FP32 else 0


@dataclass
class MemoryEstimate:
    """Bytes per device for one sharding strategy."""
    strategy: str
    setting: str  # the trainer's config for it
    sharded: str  # which states are split over the devices
    weights: float
    gradients: float
    optimizer: float
    compute_weights: float  # bf16 copies autocast keeps for backward, or FSDP's gathered (unsharded) parameters
    rope_tables: float  # the model's float32 cos / sin buffers (max_position_embeddings long), never sharded
    ddp_buckets: float  # DDP's gradient buckets: a copy of every gradient
    activations: float
    activations_checkpointed: float
    total: float
    total_checkpointed: float
    largest_batch: int | None = None  # per device, within --gpu-memory-gib
    largest_batch_checkpointed: int | None = None


class Strategy(NamedTuple):
    name: str
    setting: str  # how the trainer runs it
    sharded: str  # in words
    shards: tuple[bool, bool, bool]  # weights, gradients, AdamW moments split over the devices
    gathered: str  # the low-precision weights held while computing: autocast's casts, all blocks, or two at a time


STRATEGIES = (
    Strategy("ddp (ZeRO-0)", "parallel.mode=ddp", "nothing", (False, False, False), "casts"),
    Strategy("ZeRO-1", "not a trainer mode; for reference", "optimizer state", (False, False, True), "casts"),
    Strategy("fsdp, no reshard (ZeRO-2)", "parallel.mode=fsdp parallel.reshard_after_forward=false",
             "weights, gradients, optimizer state; bf16 weights stay gathered", (True, True, True), "all"),
    Strategy("fsdp (ZeRO-3)", "parallel.mode=fsdp", "weights, gradients, optimizer state", (True, True, True),
             "two blocks"),
)


def memory_estimate(strategy: int, counts: ParameterCounts, m: ModelConfig, batch_size: int, seq_len: int,
                    grad_accum: int, devices: int, act_bytes: int, muon: bool = False) -> MemoryEstimate:
    """Peak bytes per device of a training step. Weights and optimizer state (AdamW's two moments; with `muon`,
    one momentum buffer for the block matrices) and gradients across micro-batches
    when grad_accum > 1) persist; activations and the low-precision weight copies live from forward to backward;
    with grad_accum = 1 the gradients appear only as backward frees activations, so the peak is the larger of the
    two."""
    plan = STRATEGIES[strategy]
    shard_w, shard_g, shard_o = plan.shards
    n = counts.total

    def share(on: bool) -> float:
        return 1 / devices if on else 1.0

    states = 2 * n - (counts.muon_matrices if muon else 0)  # float32 values of optimizer state
    weights, gradients, optimizer = FP32 * n * share(shard_w), FP32 * n * share(shard_g), FP32 * states * share(shard_o)
    ddp_buckets = FP32 * n if strategy == 0 and devices > 1 else 0.0  # one device runs without the DDP wrapper
    rope_tables = float(2 * FP32 * m.max_position_embeddings * m.head_dim)
    fixed = weights + optimizer + rope_tables + ddp_buckets
    if plan.gathered == "casts":  # autocast's bf16 copies of the Linear weights (float32: none)
        compute_weights = float(act_bytes * counts.matrices) if act_bytes < FP32 else 0.0
    elif plan.gathered == "all":  # every block gathered from forward to backward
        compute_weights = float(act_bytes * n)
    else:  # the root unit (embedding, final norm) plus the block computing and the next one prefetched
        compute_weights = float(act_bytes * (counts.outside_layers + 2 * counts.per_layer))
    per_layer, head = activation_bytes_per_token(m, act_bytes)
    tokens = batch_size * seq_len
    rope = rope_table_bytes(m, seq_len, act_bytes)
    activations = float(tokens * (m.num_hidden_layers * per_layer + head) + m.num_hidden_layers * rope)
    # Checkpointing each block keeps only its float32 input and recomputes one block at a time in backward.
    checkpointed = float(tokens * (m.num_hidden_layers * FP32 * m.hidden_size + per_layer + head) + rope)

    def peak(acts: float) -> float:
        if grad_accum > 1:  # the earlier micro-batches' gradients wait while this one's activations are held
            return fixed + gradients + acts + compute_weights
        # Peak at the loss: activations all held, no gradient yet; backward then trades the one for the other.
        return fixed + max(acts + compute_weights, gradients)

    return MemoryEstimate(plan.name, plan.setting, plan.sharded, weights, gradients, optimizer, compute_weights,
                          rope_tables, ddp_buckets, activations, checkpointed, peak(activations), peak(checkpointed))


def largest_batch(fits, limit: int = 1 << 20) -> int:
    """The largest batch b >= 0 with fits(b) true, for fits monotone (true up to some b, false beyond)."""
    if not fits(1):
        return 0
    low, high = 1, 2
    while high < limit and fits(high):
        low, high = high, high * 2
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if fits(mid) else (low, mid)
    return low


def memory_table(counts: ParameterCounts, cfg: Config, devices: int, act_bytes: int,
                 gpu_memory_gib: float | None) -> list[MemoryEstimate]:
    t = cfg.train
    budget = None if gpu_memory_gib is None else gpu_memory_gib * GIB
    rows = []
    for s in range(len(STRATEGIES)):
        estimate = functools.partial(memory_estimate, s, counts, cfg.model, seq_len=t.seq_len,
                                     grad_accum=t.grad_accum, devices=devices, act_bytes=act_bytes,
                                     muon=cfg.optim.name == "muon")
        row = estimate(t.batch_size)
        if budget is not None:
            row.largest_batch = largest_batch(lambda b, e=estimate: e(b).total <= budget)
            row.largest_batch_checkpointed = largest_batch(lambda b, e=estimate: e(b).total_checkpointed <= budget)
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------------- corpus


@dataclass
class CorpusEstimate:
    path: str
    tokenizer: str  # where the tokenizer came from
    sample_bytes: int  # UTF-8 bytes of the documents tokenized
    sample_tokens: int  # their tokens, one eos per document included (as `data prepare` stores them)
    sample_documents: int
    bytes_per_token: float
    text_bytes: float  # in the whole corpus (measured, or extrapolated from the sample's share of the input)
    tokens: float
    documents: float
    exact: bool  # the sample was the whole corpus (or a prepared directory's manifest)


def _corpus_tokenizer(cfg: Config, sample: list[str]):
    """The tokenizer `train` would use: data.tokenizer, else one trained like `train` trains it (here on the
    sample rather than on the whole corpus)."""
    from minipretrain.tokenizer import Tokenizer, train_tokenizer

    if cfg.data.tokenizer:
        return Tokenizer.load(cfg.data.tokenizer), f"data.tokenizer={cfg.data.tokenizer}"
    return (train_tokenizer(sample, cfg.model.vocab_size, show_progress=False),
            f"a {cfg.model.vocab_size}-token BPE trained on the sample (no data.tokenizer given)")


def corpus_tokens(path: str, cfg: Config, sample_bytes: int) -> CorpusEstimate:
    """Tokens in a corpus: bytes per token measured with the real tokenizer on the first `sample_bytes` of it, then
    scaled by the corpus's input bytes (file sizes: JSON escapes and markup are not text, so the sample's share of
    text in its input bytes converts one to the other)."""
    from minipretrain.data.shards import is_prepared, read_manifest
    from minipretrain.data.sources import BUILTIN_PYTHON_DOCS, ReadStats, iter_documents, resolve_files

    if is_prepared(path):  # tokenized already: the manifest counts them
        manifest = read_manifest(path)
        tokens = sum(split["tokens"] for split in manifest["splits"].values())
        documents, bytes_per_token = manifest["summary"]["documents"], manifest["summary"]["bytes_per_token"]
        return CorpusEstimate(path, "the prepared directory's own", 0, tokens, documents, bytes_per_token,
                              bytes_per_token * tokens, tokens, documents, True)
    # The built-in corpus has no files to measure: it is read whole (a few MB).
    total_input = None if path == BUILTIN_PYTHON_DOCS else sum(f.stat().st_size for f in resolve_files(path))
    stats, sample, exact = ReadStats(), [], True
    for text in iter_documents(path, cfg.data.text_field, cfg.data.skip_bad_lines, stats):
        sample.append(text)
        if total_input is not None and stats.bytes >= sample_bytes:
            exact = stats.input_bytes >= total_input
            break
    if not sample:
        raise ConfigError(f"--data {path}: no documents in it ({stats.summary()})")
    tokenizer, source = _corpus_tokenizer(cfg, sample)
    sample_tokens = sum(len(ids) + 1 for ids in tokenizer.encode_batch(sample))  # + eos after each document
    scale = 1.0 if exact else total_input / stats.input_bytes
    return CorpusEstimate(path, source, stats.bytes, sample_tokens, stats.documents, stats.bytes / sample_tokens,
                          stats.bytes * scale, sample_tokens * scale, stats.documents * scale, exact)


# --------------------------------------------------------------------------------------------------- measure


def _peak_rss_bytes() -> int:
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # bytes on macOS, KiB on Linux


def _tensor_bytes(tensors) -> int:
    """Bytes of the distinct storages behind `tensors` (a tied weight or a view counted once)."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors if t is not None}
    return sum(storages.values())


def _profiled_peak_bytes(step) -> int:
    """The largest rise of CPU tensor memory while step() runs, from the allocations and frees torch's profiler
    records (every tensor from c10's CPU allocator, the CPU analogue of torch.cuda.max_memory_allocated)."""
    import os

    from torch.profiler import ProfilerActivity, profile

    saved_stderr = os.dup(2)  # the profiler logs its start and stop on stderr: not the user's business
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
                step()
    finally:
        os.dup2(saved_stderr, 2)
        os.close(saved_stderr)
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for event in events:
        live += event.nbytes()  # negative for a free
        peak = max(peak, live)
    return peak


def measure(cfg: Config, steps: int) -> dict:
    """Runs real training steps of `cfg` on random tokens (the trainer's own accumulate_gradients /
    apply_gradients, optimizer, autocast and scaler; no data loading, one process): a first step that allocates
    the AdamW state, `steps` timed ones (their median gives tokens/s), and one more for the peak memory. On CUDA
    the peak is torch.cuda.max_memory_allocated; on the CPU the tensors alive before that step (weights, AdamW
    state, batch) plus the largest rise the profiler records during it, timed steps kept unprofiled. The process's
    peak RSS is reported too, for context: what the OS saw, torch's runtime and allocator caching included (call
    this in a fresh process, measure_in_subprocess, so that it belongs to this run alone)."""
    from minipretrain.data.batches import Batch
    from minipretrain.model import MiniMind
    from minipretrain.parallel import World, resolve_device
    from minipretrain.precision import configure_device, mixed_precision, resolve_precision
    from minipretrain.train.loop import seed_everything
    from minipretrain.train.optim import build_optimizer
    from minipretrain.train.step import accumulate_gradients, apply_gradients

    t = cfg.train
    device = resolve_device(t.device)
    precision = resolve_precision(t.dtype, device)
    configure_device(device, t.deterministic)
    seed_everything(t.seed)
    gen = torch.Generator().manual_seed(t.seed)
    inputs = [torch.randint(0, cfg.model.vocab_size, (t.batch_size, t.seq_len), generator=gen)
              for _ in range(t.grad_accum)]
    micro_batches = [Batch(x, x.clone()) for x in inputs]  # labels = inputs, as packed rows have them
    model = MiniMind(cfg.model).to(device)
    optimizer = build_optimizer(model, cfg.optim, device.type)
    autocast, scaler = mixed_precision(device, precision.dtype)
    world = World(device=device)

    def step() -> None:
        accumulate_gradients(model, micro_batches, autocast, scaler, world, model.causal)
        apply_gradients(model, optimizer, scaler, cfg.optim.grad_clip)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        step()
        peak, method = torch.cuda.max_memory_allocated(device), "torch.cuda.max_memory_allocated"
    else:
        state = [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
        live = _tensor_bytes([*model.parameters(), *model.buffers(), *state, *(x for b in micro_batches for x in b)])
        peak = live + _profiled_peak_bytes(step)
        method = "tensors alive before a step + the largest rise torch's profiler records in it"
    step_s = statistics.median(times)
    return {"device": str(device), "dtype": precision.name, "threads": torch.get_num_threads(), "steps": steps,
            "step_s": step_s, "tokens_per_s": t.batch_size * t.grad_accum * t.seq_len / step_s,
            "peak_memory_bytes": peak, "memory_method": method, "peak_rss_bytes": _peak_rss_bytes()}


def measure_in_subprocess(cfg: Config, steps: int) -> dict:
    """measure() in a fresh interpreter, so that the peak it reads belongs to the training steps alone."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(measure, cfg, steps).result()


# ------------------------------------------------------------------------------------------------------ plan


def amp_bytes(cfg: Config) -> int:
    """Activation bytes of the planned GPU run: train.dtype=auto is bf16 on GPUs (fp16 takes the same)."""
    return FP32 if cfg.train.dtype == "float32" else 2


def _epochs_note(epochs: float | None) -> str:
    return f" (train.epochs={epochs:g})" if epochs else ""


def make_plan(cfg: Config, options: PlanOptions, measured: dict | None = None) -> dict:
    """Every number of the plan as a JSON-ready dict (bytes, FLOPs, tokens, seconds: plain units)."""
    m, t = cfg.model, cfg.train
    counts = count_parameters(m)
    act_bytes = amp_bytes(cfg)
    token_flops = flops_per_token(m, counts.active, t.seq_len)
    step_tokens = tokens_per_step(t.batch_size, options.devices, t.grad_accum, t.seq_len)
    optimal_tokens = chinchilla_tokens(counts.total)
    peak = options.peak_tflops or (gpu_peak_tflops(options.gpu, torch.float32 if act_bytes == FP32 else torch.bfloat16)
                                   if options.gpu else None)
    corpus = corpus_tokens(options.data, cfg, int(options.sample_mb * 1e6)) if options.data is not None else None
    max_steps = t.max_steps
    if t.epochs is not None:  # the run's length in passes over the corpus, as the trainer derives it from the rows
        if corpus is None:
            raise UserError("train.epochs sets the run's length from the data: pass --data to count its tokens")
        max_steps = steps_for_epochs(t.epochs, corpus.tokens, step_tokens)
    plan: dict = {
        "model": {**asdict(counts), "layers": m.num_hidden_layers, "hidden_size": m.hidden_size,
                  "heads": m.num_attention_heads, "kv_heads": m.num_key_value_heads, "head_dim": m.head_dim,
                  "intermediate_size": m.intermediate_size, "vocab_size": m.vocab_size, "moe": m.moe},
        "flops": {"formula": FLOPS_FORMULA, "per_token": token_flops, "parameter_term": 6 * counts.active,
                  "attention_term": token_flops - 6 * counts.active, "seq_len": t.seq_len},
        "batch": {"batch_size": t.batch_size, "devices": options.devices, "grad_accum": t.grad_accum,
                  "seq_len": t.seq_len, "tokens_per_step": step_tokens, "max_steps": max_steps, "epochs": t.epochs,
                  "run_tokens": max_steps * step_tokens, "run_flops": max_steps * step_tokens * token_flops},
        "chinchilla": {"tokens_per_parameter": TOKENS_PER_PARAMETER, "optimal_tokens": optimal_tokens,
                       "optimal_steps": math.ceil(optimal_tokens / step_tokens),
                       "optimal_flops": 6 * counts.total * optimal_tokens,
                       "run_tokens_per_parameter": max_steps * step_tokens / counts.total},
    }
    budget = options.budget_flops
    if options.gpu_hours is not None:
        budget = gpu_hours_to_flops(options.gpu_hours, peak, options.mfu)
    if budget is not None:
        n, d = compute_optimal(budget)
        plan["budget"] = {"flops": budget, "gpu_hours": options.gpu_hours, "peak_tflops": peak, "mfu": options.mfu,
                          "optimal_parameters": n, "optimal_tokens": d,
                          "config_tokens_in_budget": budget / token_flops,
                          "config_steps_in_budget": budget / token_flops / step_tokens}
    if corpus is not None:
        plan["corpus"] = {**asdict(corpus), "steps_per_epoch": corpus.tokens / step_tokens,
                          "run_epochs": max_steps * step_tokens / corpus.tokens,
                          "chinchilla_epochs": optimal_tokens / corpus.tokens}
    plan["memory"] = {
        "dtype": "float32" if act_bytes == FP32 else "bf16 autocast, float32 weights / gradients / optimizer state",
        "activation_bytes_per_token": dict(zip(("per_layer", "head"), activation_bytes_per_token(m, act_bytes),
                                                  strict=True)),
        "gpu_memory_gib": options.gpu_memory_gib,
        "strategies": [asdict(row) for row in memory_table(counts, cfg, options.devices, act_bytes,
                                                          options.gpu_memory_gib)]}
    if options.pipeline_stages is not None:
        plan["pipeline"] = {"stages": options.pipeline_stages, "microbatches": options.microbatches,
                            "bubble": pipeline_bubble(options.pipeline_stages, options.microbatches)}
    throughput, source = options.tokens_per_s, "--tokens-per-s"
    if measured is not None:
        one = 1 if measured["device"] == "cpu" else options.devices  # CPU: this machine, not a GPU cluster
        throughput, source = measured["tokens_per_s"] * one, f"measured on {measured['device']}"
        estimate = memory_estimate(0, counts, m, t.batch_size, t.seq_len, t.grad_accum, 1,
                                   2 if measured["dtype"] in ("bfloat16", "float16") else FP32,
                                   muon=cfg.optim.name == "muon")
        plan["measured"] = {**measured, "estimated_peak_bytes": estimate.total,
                            "estimate_over_measured": estimate.total / measured["peak_memory_bytes"]}
    elif throughput is None and peak is not None:
        throughput, source = options.devices * peak * 1e12 * options.mfu / token_flops, "peak x --mfu"
    if throughput is not None:
        plan["time"] = {"tokens_per_s": throughput, "source": source,
                        "run_s": max_steps * step_tokens / throughput, "chinchilla_s": optimal_tokens / throughput}
    return plan


# ---------------------------------------------------------------------------------------------------- output


def _num(x: float) -> str:
    """1234567 -> 1.23M: compact counts for the table (JSON keeps every digit); past peta, powers of ten."""
    if abs(x) >= 1e18:
        mantissa, exponent = f"{x:.2e}".split("e")
        return f"{mantissa}e{int(exponent)}"
    for scale, suffix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{suffix}"
    return f"{x:.3g}"


def _gib(x: float) -> str:
    return f"{x / GIB:.2f} GiB" if x >= GIB / 10 else f"{x / 2**20:.1f} MiB"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.1f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def format_plan(plan: dict) -> str:
    lines: list[str] = []

    def section(title: str, rows: list[tuple[str, str]]) -> None:
        lines.append(title)
        width = max(len(label) for label, _ in rows)
        lines.extend(f"  {label:<{width}}  {value}" for label, value in rows)
        lines.append("")

    p, f, b, c = plan["model"], plan["flops"], plan["batch"], plan["chinchilla"]
    section("parameters", [
        ("total", f"{p['total']:,} ({_num(p['total'])}; tied embedding counted once)"),
        ("embedding", f"{p['embedding']:,} (vocab {p['vocab_size']} x hidden {p['hidden_size']})"),
        ("non-embedding", f"{p['non_embedding']:,}"),
        ("active per token", f"{p['active']:,}" + (" (mixture of experts)" if p["moe"] else " (dense: all)")),
        ("per layer", f"{p['per_layer']:,} x {p['layers']} layers")])
    section("compute", [
        ("FLOPs per token", f"{_num(f['per_token'])} = {f['formula'].split(' = ', 1)[1]} = "
                            f"{_num(f['parameter_term'])} + "
                            f"{_num(f['attention_term'])} (T = {f['seq_len']})"),
        ("tokens per step", f"{b['tokens_per_step']:,} = batch {b['batch_size']} x devices {b['devices']} x "
                            f"accum {b['grad_accum']} x seq {b['seq_len']}"),
        ("configured run", f"{b['max_steps']:,} steps{_epochs_note(b['epochs'])} = "
                           f"{_num(b['run_tokens'])} tokens = {_num(b['run_flops'])} FLOPs "
                           f"({c['run_tokens_per_parameter']:.2f} tokens per parameter)"),
        ("Chinchilla tokens", f"{_num(c['optimal_tokens'])} (20 x N) = {c['optimal_steps']:,} steps = "
                              f"{_num(c['optimal_flops'])} FLOPs (6 x N x D)")])
    if "budget" in plan:
        g = plan["budget"]
        source = (f"{g['gpu_hours']:g} GPU-hours x {g['peak_tflops']:g} TFLOP/s x MFU {g['mfu']:g}"
                  if g["gpu_hours"] is not None else "--budget-flops")
        section("compute budget", [
            ("budget", f"{_num(g['flops'])} FLOPs ({source})"),
            ("compute-optimal N", f"{_num(g['optimal_parameters'])} parameters (sqrt(C / 120))"),
            ("compute-optimal D", f"{_num(g['optimal_tokens'])} tokens (20 x N)"),
            ("this config", f"{_num(g['config_tokens_in_budget'])} tokens = {g['config_steps_in_budget']:,.0f} steps "
                            "in the budget")])
    if "corpus" in plan:
        d = plan["corpus"]
        how = "exact: the whole corpus" if d["exact"] else f"extrapolated from a {_num(d['sample_bytes'])}B sample"
        section("corpus", [
            ("data", d["path"]), ("tokenizer", d["tokenizer"]),
            ("bytes per token", f"{d['bytes_per_token']:.3f} ({how})"),
            ("tokens", f"{_num(d['tokens'])} in {_num(d['documents'])} documents, {_num(d['text_bytes'])}B of text"),
            ("epochs", f"{d['steps_per_epoch']:,.0f} steps per epoch; the configured run {d['run_epochs']:.2f} "
                       f"epochs, Chinchilla's tokens {d['chinchilla_epochs']:.2f} epochs")])
    mem = plan["memory"]
    per_layer, head = mem["activation_bytes_per_token"].values()
    lines.append(f"memory per device ({mem['dtype']}; activations {per_layer:,} B per token per layer + {head:,} B "
                 f"per token for the head; batch {b['batch_size']} x seq {b['seq_len']}, {b['devices']} device(s))")
    header = ["strategy", "weights", "grads", "optimizer", "bf16/gathered", "RoPE", "DDP buckets", "activations",
              "peak", "peak with act. ckpt"]
    if mem["gpu_memory_gib"] is not None:
        header += [f"max batch in {mem['gpu_memory_gib']:g} GiB", "with act. ckpt"]
    table = [header]
    for r in mem["strategies"]:
        row = [r["strategy"], _gib(r["weights"]), _gib(r["gradients"]), _gib(r["optimizer"]),
               _gib(r["compute_weights"]), _gib(r["rope_tables"]), _gib(r["ddp_buckets"]), _gib(r["activations"]),
               _gib(r["total"]),
               _gib(r["total_checkpointed"])]
        if mem["gpu_memory_gib"] is not None:
            row += [str(r["largest_batch"]), str(r["largest_batch_checkpointed"])]
        table.append(row)
    widths = [max(len(row[j]) for row in table) for j in range(len(header))]
    for row in table:
        lines.append("  " + "  ".join(cell.ljust(w) if j == 0 else cell.rjust(w)
                                      for j, (cell, w) in enumerate(zip(row, widths, strict=True))))
    lines.append("  sharded over the devices: " + "; ".join(f"{r['strategy']}: {r['sharded']}"
                                                          for r in mem["strategies"]))
    lines.append("")
    if "pipeline" in plan:
        q = plan["pipeline"]
        section("pipeline", [("bubble", f"{100 * q['bubble']:.1f}% idle = (p - 1) / (m + p - 1) with "
                                        f"p = {q['stages']} stages, m = {q['microbatches']} micro-batches")])
    if "measured" in plan:
        r = plan["measured"]
        section("measured", [
            ("throughput", f"{r['tokens_per_s']:,.0f} tokens/s on {r['device']} ({r['dtype']}, {r['threads']} threads; "
                           f"median of {r['steps']} steps of {r['step_s']:.3f} s)"),
            ("peak memory", f"{_gib(r['peak_memory_bytes'])} measured ({r['memory_method']}); estimated "
                            f"{_gib(r['estimated_peak_bytes'])} ({r['estimate_over_measured']:.2f} x measured)"),
            ("process peak RSS", f"{_gib(r['peak_rss_bytes'])} (torch's runtime and allocator caches included)")])
    if "time" in plan:
        s = plan["time"]
        section("time", [("throughput", f"{s['tokens_per_s']:,.0f} tokens/s ({s['source']})"),
                         ("configured run", _duration(s["run_s"])),
                         ("Chinchilla tokens", _duration(s["chinchilla_s"]))])
    return "\n".join(lines).rstrip()
