"""Plots of one or more runs from their metrics.jsonl: training and validation loss, bits per byte, learning rate,
gradient norm and throughput, against steps or tokens.

    minipretrain plot runs/demo                         # -> runs/demo/plots.png
    minipretrain plot runs/a runs/b --x tokens --out compare.png

`run_series` pulls the series out of the records and `draw` only draws them, so what a panel shows can be checked
against the metrics file. matplotlib is an extra (`pip install 'minipretrain[plot]'`), imported only here.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

from minipretrain.errors import UserError
from minipretrain.train.metrics import read_metrics

PLOT_FILE = "plots.png"  # what `train` writes into the run directory at each checkpoint
X_AXES = ("step", "tokens")
# panel -> (metrics.jsonl field, title); the train-loss panel also draws a smoothed curve over the raw one.
PANELS = {
    "train_loss": ("loss", "train loss"),
    "val_loss": ("val_loss", "validation loss"),
    "val_bpb": ("val_bpb", "validation bits per byte"),
    "lr": ("lr", "learning rate"),
    "grad_norm": ("grad_norm", "gradient norm (before clipping)"),
    "tokens_per_s": ("tokens_per_s", "tokens / s"),
}

Series = tuple[np.ndarray, np.ndarray]


def load_runs(run_dirs: list[str | Path]) -> dict[str, list[dict]]:
    """{legend name: records} for each run directory; the name is the directory's, or its path when two share one."""
    paths = [Path(p) for p in run_dirs]
    for path in paths:
        if not (path / "metrics.jsonl").is_file():
            raise UserError(f"{path} has no metrics.jsonl: give a run directory (--run-dir of `minipretrain train`)")
    names = [p.resolve().name for p in paths]
    return {(name if names.count(name) == 1 else str(path)): read_metrics(path / "metrics.jsonl")
            for name, path in zip(names, paths, strict=True)}


def run_series(records: list[dict], x: str = "step") -> dict[str, Series]:
    """{panel: (x, y)} of one run's records, only the panels it has data for. Validation lines carry no token
    count: their tokens are interpolated from the training lines around them (0 at step 0)."""
    train = [r for r in records if "loss" in r and "tokens" in r]
    steps = np.array([0] + [r["step"] for r in train], dtype=float)
    tokens = np.array([0] + [r["tokens"] for r in train], dtype=float)
    out = {}
    for panel, (field, _) in PANELS.items():
        rows = [r for r in records if isinstance(r.get(field), (int, float))]
        if not rows:
            continue
        xs = np.array([r["step"] for r in rows], dtype=float)
        if x == "tokens":
            xs = np.interp(xs, steps, tokens)
        out[panel] = (xs, np.array([r[field] for r in rows], dtype=float))
    return out


def collect(runs: dict[str, list[dict]], x: str = "step") -> dict[str, dict[str, Series]]:
    """{panel: {run: (x, y)}}: what `draw` plots."""
    per_run = {name: run_series(records, x) for name, records in runs.items()}
    return {panel: {name: series[panel] for name, series in per_run.items() if panel in series} for panel in PANELS}


def smooth(values: np.ndarray) -> np.ndarray:
    """An exponential moving average over about 2% of the points (none for short runs), started at the first
    value so that it is not pulled towards zero."""
    span = max(1, len(values) // 50)
    alpha, out, level = 2 / (span + 1), np.empty_like(values), values[0] if len(values) else 0.0
    for i, value in enumerate(values):
        level = alpha * value + (1 - alpha) * level
        out[i] = level
    return out


def _matplotlib():
    try:
        import matplotlib
    except ImportError:
        raise UserError("plot needs matplotlib: pip install 'minipretrain[plot]'") from None
    matplotlib.use("Agg", force=False)  # no display needed; a backend chosen by the user already stays
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    return Figure, FigureCanvasAgg


def draw(data: dict[str, dict[str, Series]], run_names: list[str], x: str = "step"):
    """A matplotlib Figure with one panel per entry of PANELS; a run keeps its colour in every panel."""
    Figure, FigureCanvasAgg = _matplotlib()
    fig = Figure(figsize=(12, 6.5), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 3).ravel()
    # Fixed margins: a layout engine would measure every tick label first, doubling the cost of a plot.
    fig.subplots_adjust(left=0.06, right=0.985, top=0.95, bottom=0.08, hspace=0.38, wspace=0.22)
    colors = {name: f"C{i % 10}" for i, name in enumerate(run_names)}
    for ax, (panel, (_, title)) in zip(axes, PANELS.items(), strict=True):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("tokens" if x == "tokens" else "step", fontsize=9)
        ax.tick_params(which="both", labelsize=8)  # minor labels too: a log axis labels them
        ax.grid(alpha=0.3)
        runs = data.get(panel, {})
        if not runs:
            ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", va="center", color="gray")
            continue
        for name, (xs, ys) in runs.items():
            marker = "o" if len(xs) < 30 else None  # a few validation points read better as dots
            if panel == "train_loss":
                ax.plot(xs, ys, color=colors[name], alpha=0.25, linewidth=0.8, label="_raw")
                ax.plot(xs, smooth(ys), color=colors[name], linewidth=1.5, label=name)
            else:
                ax.plot(xs, ys, color=colors[name], linewidth=1.2, marker=marker, markersize=3, label=name)
        values = np.concatenate([ys for _, ys in runs.values()])
        if panel == "grad_norm" and values.min() > 0 and values.max() > 10 * values.min():
            ax.set_yscale("log")  # early spikes would flatten the rest on a linear axis
    axes[0].legend(fontsize=8)
    return fig


def save_figure(fig, out: Path) -> None:
    """Written under a temporary name and renamed: a reader never sees half a PNG."""
    tmp = out.with_name(f".{out.stem}.tmp{out.suffix}")
    fig.savefig(tmp)
    os.replace(tmp, out)


def plot_runs(run_dirs: list[str | Path], out: str | Path | None = None, x: str = "step") -> Path:
    """Draw the runs into one PNG; returns its path. Default: RUN/plots.png for one run, ./plots.png for several."""
    if x not in X_AXES:
        raise UserError(f"--x {x}: expected step or tokens")
    out = Path(out) if out is not None else Path(run_dirs[0]) / PLOT_FILE if len(run_dirs) == 1 else Path(PLOT_FILE)
    if out.is_dir():
        raise UserError(f"--out {out} is a directory: give a file name, e.g. {out / PLOT_FILE}")
    if out.suffix.lower() != ".png":
        raise UserError(f"--out {out}: expected a .png file name")
    if not out.parent.is_dir():
        raise UserError(f"--out {out}: directory {out.parent} does not exist")
    runs = load_runs(run_dirs)
    _matplotlib()  # a missing matplotlib is reported before any drawing
    fig = draw(collect(runs, x), list(runs), x)
    save_figure(fig, out)
    return out


def write_run_plot(run_dir: Path) -> None:
    """RUN/plots.png during training: skipped without matplotlib, and a failure is a warning, never fatal."""
    if importlib.util.find_spec("matplotlib") is None:  # an optional extra: no plot, and no error
        return
    try:
        plot_runs([run_dir])
    except Exception as e:
        tqdm.write(f"warning: could not write {run_dir / PLOT_FILE} ({type(e).__name__}: {e})", file=sys.stderr)
