"""metrics.jsonl: one JSON object per logged step (and per validation), flushed as it is written, and passed on
to the experiment trackers (trackers.py)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

FLOPS_FORMULA = "FLOPs/token = 6*N + 12*L*H*Q*T"

# Dense (no sparsity) tensor-core peaks in TFLOP/s from NVIDIA's data sheets: (name fragment, bf16/fp16, TF32).
# float32 runs use the TF32 peak: the trainer enables TF32 for float32 matmuls on CUDA. The first fragment found
# in the device name wins, so the specific names (NVL, PCIe) come before the generic ones.
GPU_PEAK_TFLOPS = (("H100 NVL", 835.0, 417.5), ("H200 NVL", 835.0, 417.5), ("H100 PCIe", 756.0, 378.0),
                   ("H100", 989.0, 494.5), ("H200", 989.0, 494.5), ("A100", 312.0, 156.0))


def gpu_peak_tflops(device_name: str, dtype: torch.dtype) -> float | None:
    """The dense peak of a GPU (as torch.cuda.get_device_name names it) for a run in `dtype`, or None for a GPU
    not in the table."""
    for fragment, half_precision, tf32 in GPU_PEAK_TFLOPS:
        if fragment.lower() in device_name.lower():
            return tf32 if dtype == torch.float32 else half_precision
    return None


def flops_per_token(cfg, num_parameters: int, seq_len: int) -> int:
    """Training FLOPs per token, nanoGPT's convention: 6 per parameter (forward + backward) plus attention scores
    12*L*H*Q*T (L layers, H heads, Q head dim, T sequence length)."""
    return 6 * num_parameters + 12 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim * seq_len


def _parse(line: str) -> dict | None:
    """A record, or None for a blank line or the torn last line of a killed run."""
    try:
        return json.loads(line) if line.strip() else None
    except json.JSONDecodeError:
        return None


class MetricsLog:
    def __init__(self, path: Path, resume_step: int = 0, trackers=None):
        self.path, self.trackers = path, trackers
        if resume_step and path.exists():
            # A resumed run rewrites its history from the checkpoint on: drop what came after it.
            kept = [line for line in path.read_text(encoding="utf-8").splitlines()
                    if (record := _parse(line)) is not None and record.get("step", 0) <= resume_step]
            tmp = path.with_suffix(".tmp")
            tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
            os.replace(tmp, path)
        elif not resume_step and path.exists():
            path.unlink()
        self.file = open(path, "a", encoding="utf-8")  # noqa: SIM115 (open for the whole run, closed by close())

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.trackers is not None:
            self.trackers.log(record)

    def close(self) -> None:
        self.file.close()


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a metrics.jsonl, without the torn last line of a run killed while writing it."""
    return [record for line in Path(path).read_text(encoding="utf-8").splitlines()
            if (record := _parse(line)) is not None]
