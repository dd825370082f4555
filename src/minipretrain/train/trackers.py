"""Experiment trackers: every record written to metrics.jsonl also goes to TensorBoard, Weights & Biases or SwanLab.

    check_loggers(cfg.train.loggers)              # before any work: a missing package is a one-line error
    trackers = Trackers()
    trackers.start(cfg, run_dir, step=0)          # rank 0; on --resume the step of the checkpoint
    trackers.log({"step": 10, "loss": 3.2, ...})  # the step is the x-axis
    trackers.close()

metrics.jsonl stays the source of truth: a tracker that fails while logging is warned about once and switched off,
never stopping training. The ids of the tracker runs are kept in RUN/trackers.json, so `--resume` continues them.
"""

from __future__ import annotations

import importlib
import json
import shutil
import sys
from pathlib import Path
from typing import Any

from tqdm import tqdm

from minipretrain.errors import ConfigError, UserError

TRACKERS_FILE = "trackers.json"  # {"wandb": {"id": ...}, "swanlab": {"id": ...}}
# What each tracker writes inside the run directory (an --overwrite run removes them with the rest).
TRACKER_DIRS = ("tensorboard", "wandb", "swanlog")


def check_loggers(loggers: list[str]) -> None:
    """Import the package of each tracker asked for (each is named as its package and its extra): a missing one
    fails here, before any work."""
    for name in loggers:
        if name == "jsonl":
            continue
        try:
            importlib.import_module(name)
        except Exception:  # missing, or broken (e.g. a protobuf mismatch): either way it cannot log
            raise ConfigError(f'train.loggers: "{name}" needs the {name} package: '
                              f"pip install 'minipretrain[{name}]'") from None


def scalars(record: dict) -> dict[str, float]:
    """The numbers of a metrics record, nested tables flattened (`val_loss_by_source/web`); `step` is the x-axis."""
    out = {}
    for key, value in record.items():
        if key == "step":
            continue
        if isinstance(value, dict):
            out.update({f"{key}/{k}": v for k, v in scalars(value).items()})
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key] = value
    return out


class TensorBoardTracker:
    name = "tensorboard"

    def __init__(self, run_dir: Path, config: dict, step: int):
        from torch.utils.tensorboard import SummaryWriter

        log_dir = run_dir / "tensorboard"
        if not step:  # a fresh run starts metrics.jsonl over: its events too, or two runs would share one curve
            shutil.rmtree(log_dir, ignore_errors=True)
        # purge_step: a resumed run drops the events logged after its checkpoint, so curves do not double back.
        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=step + 1 if step else None)
        if not step:
            self.writer.add_text("config", "```\n" + json.dumps(config, indent=2) + "\n```", 0)

    def log(self, values: dict[str, float], step: int) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)

    def close(self, failed: bool = False) -> None:
        self.writer.close()


class WandbTracker:
    name = "wandb"

    def __init__(self, run_dir: Path, config: dict, project: str, run_name: str, mode: str | None,
                 run_id: str | None):
        import wandb

        # resume="allow" with the saved id continues that run (a fresh run has no id yet: wandb draws one).
        self.run = wandb.init(project=project, name=run_name, dir=str(run_dir), mode=mode, config=config,
                              id=run_id, resume="allow" if run_id else None, allow_val_change=True,
                              reinit="create_new")
        self.id = self.run.id

    def log(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def close(self, failed: bool = False) -> None:
        self.run.finish(exit_code=1 if failed else 0)


class SwanlabTracker:
    name = "swanlab"

    def __init__(self, run_dir: Path, config: dict, project: str, run_name: str, mode: str | None,
                 run_id: str | None):
        import swanlab

        # interactive=False: online without a saved login fails with a message instead of waiting at a prompt.
        self.run = swanlab.init(project=project, name=run_name, log_dir=str(run_dir / "swanlog"), mode=mode,
                                config=config, id=run_id, resume="allow" if run_id else None, reinit=True,
                                settings=swanlab.Settings(interactive=False))
        self.id = self.run.id

    def log(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def close(self, failed: bool = False) -> None:
        if failed:
            self.run.finish("crashed", error="training failed")
        else:
            self.run.finish()


class Trackers:
    """The trackers of one run, fed every metrics record; one that fails is warned about once and dropped."""

    def __init__(self, trackers: list | None = None):
        self.trackers = list(trackers or [])

    def start(self, cfg, run_dir: Path, step: int = 0) -> None:
        """Start the trackers of `cfg.train.loggers` (rank 0 only). `step` > 0: a resumed run, which continues the
        tracker runs whose ids RUN/trackers.json kept. A tracker that cannot start is a one-line error."""
        t = cfg.train
        config, run_name = cfg.to_dict(), t.run_name or run_dir.resolve().name
        saved = _saved_ids(run_dir) if step else {}
        for name in t.loggers:
            try:
                if name == "tensorboard":
                    self.trackers.append(TensorBoardTracker(run_dir, config, step))
                elif name in ("wandb", "swanlab"):
                    cls = WandbTracker if name == "wandb" else SwanlabTracker
                    self.trackers.append(cls(run_dir, config, t.project, run_name, t.tracker_mode,
                                             saved.get(name, {}).get("id")))
            except Exception as e:
                message = " ".join(str(e).split()) or type(e).__name__
                hint = "" if name == "tensorboard" else \
                    f" (log in with `{name} login`, or --set train.tracker_mode=offline)"
                raise UserError(f'train.loggers: "{name}" failed to start: {message}{hint}') from None
        ids = {tracker.name: {"id": tracker.id} for tracker in self.trackers if hasattr(tracker, "id")}
        if ids:
            (run_dir / TRACKERS_FILE).write_text(json.dumps({**saved, **ids}, indent=2) + "\n", encoding="utf-8")

    def log(self, record: dict) -> None:
        if not self.trackers:
            return
        values, step = scalars(record), int(record["step"])
        for tracker in list(self.trackers):
            try:
                tracker.log(values, step)
            except Exception as e:  # metrics.jsonl has the record: training goes on without this tracker
                self.trackers.remove(tracker)
                _warn(f"{tracker.name} failed at step {step} ({type(e).__name__}: {e}); it is off for the rest "
                      f"of this run (metrics.jsonl has every record)")

    def close(self, failed: bool = False) -> None:
        for tracker in self.trackers:
            try:
                tracker.close(failed)
            except Exception as e:
                _warn(f"{tracker.name} failed to close ({type(e).__name__}: {e})")
        self.trackers = []


def _warn(message: str) -> None:
    tqdm.write(f"warning: {message}", file=sys.stderr)


def _saved_ids(run_dir: Path) -> dict[str, Any]:
    path = run_dir / TRACKERS_FILE
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
    except json.JSONDecodeError:
        _warn(f"{path} is not valid JSON: the trackers start new runs")
        return {}
