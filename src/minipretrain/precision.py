"""Numerics of a run: the dtype autocast computes in, the loss scaler, and the device switches that go with them.

    precision = resolve_precision(cfg.train.dtype, device)   # Precision(dtype, reason)
    configure_device(device, cfg.train.deterministic)        # denormals, TF32, deterministic kernels
    autocast, scaler = mixed_precision(device, precision.dtype)

Weights, gradients and optimizer state stay in float32 whatever the dtype: autocast runs matmuls and attention in
bf16 / fp16 and keeps reductions (norms, softmax, the loss) in float32.
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from minipretrain.errors import ConfigError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}  # config.DTYPE_NAMES


@dataclass(frozen=True)
class Precision:
    dtype: torch.dtype
    reason: str  # why this dtype, for the start-up line

    @property
    def name(self) -> str:
        return str(self.dtype).removeprefix("torch.")


def native_cpu_bf16() -> str | None:
    """The CPU feature that runs bf16 matmuls in hardware ("AMX-BF16" or "AVX512-BF16"), as torch's CPU capability
    reports it, or None (bf16 would then be emulated, slower than float32)."""
    capabilities = getattr(torch.cpu, "get_capabilities", None)
    if capabilities is not None:
        found = capabilities()
        amx, avx512 = found.get("amx_bf16", False), found.get("avx512_bf16", False)
    else:  # older torch
        amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
        avx512 = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
    return "AMX-BF16" if amx else "AVX512-BF16" if avx512 else None


def resolve_precision(name: str, device: torch.device, key: str = "train.dtype") -> Precision:
    """`train.dtype` (or the option `key`) on `device`. auto: bf16 on CUDA where supported (else fp16 with loss
    scaling), bf16 on a CPU with native bf16 (else float32), float32 elsewhere. Explicit: bfloat16 on CUDA and CPU,
    float16 on CUDA only."""
    if name == "auto":
        if device.type == "cuda":
            if torch.cuda.is_bf16_supported():
                return Precision(torch.bfloat16, "auto: the GPU supports bf16")
            return Precision(torch.float16, "auto: the GPU has no bf16, so fp16 with loss scaling")
        if device.type == "cpu":
            feature = native_cpu_bf16()
            if feature:
                return Precision(torch.bfloat16, f"auto: the CPU has native bf16 ({feature})")
            return Precision(torch.float32,
                             "auto: the CPU has no native bf16 (AVX512-BF16 or AMX); "
                             "train.dtype=bfloat16 would emulate it")
        return Precision(torch.float32, f"auto: no mixed precision on {device.type}")
    dtype = DTYPES[name]
    if dtype == torch.float16 and device.type != "cuda":
        raise ConfigError(f"{key}=float16 needs a CUDA device ({device.type} has no fp16 loss scaling "
                          "here): use bfloat16 or float32")
    if dtype == torch.bfloat16 and device.type not in ("cuda", "cpu"):
        raise ConfigError(f"{key}=bfloat16 runs on CUDA or CPU, not {device.type}: use float32")
    if dtype == torch.bfloat16 and device.type == "cpu" and not native_cpu_bf16():
        return Precision(dtype, f"{key}={name}, emulated: this CPU has no native bf16, float32 is faster here")
    return Precision(dtype, f"{key}={name}")


def exact_dtype(device: torch.device | str) -> torch.dtype:
    """The dtype of sums and statistics kept on the training device (losses over a window, the spike guard's
    running statistics): float64, except on MPS, which has none."""
    return torch.float32 if torch.device(device).type == "mps" else torch.float64


def mixed_precision(device: torch.device, amp_dtype: torch.dtype):
    """The autocast context for forward passes and the loss scaler (active for fp16 only)."""
    autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype != torch.float32 else nullcontext()
    return autocast, torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)


def load_scaler_state(scaler: torch.amp.GradScaler, state: dict) -> None:
    """A checkpoint saved without loss scaling (bf16 or fp32) holds an empty scaler state: an fp16 run resumed
    from it starts a fresh scale instead of failing."""
    if state:
        scaler.load_state_dict(state)


def request_deterministic_cublas() -> None:
    """cuBLAS is deterministic only with a fixed workspace, and reads this variable once, at the process's first
    matmul on a GPU: a process that wants `train.deterministic` sets it before touching CUDA (the trainer does so
    first thing; in a notebook, export it before starting Python)."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def configure_device(device: torch.device, deterministic: bool = False) -> None:
    """Process-wide numerics switches for training or inference on `device` (they stay set after the run)."""
    if device.type == "cpu":
        torch.set_flush_denormal(True)  # denormals in Adam's state can make CPU steps several times slower
    if device.type == "cuda":
        # float32 matmuls on TF32 tensor cores, for fp32 runs and the fp32 parts of autocast. Through this API
        # rather than the per-backend fp32_precision flags: torch.compile in torch 2.11 still reads what it sets,
        # and mixing the two APIs raises.
        torch.set_float32_matmul_precision("high")
    if deterministic:
        request_deterministic_cublas()
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
