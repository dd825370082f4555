import json
import re
import struct
import sys
from pathlib import Path

import pytest
from conftest import assert_cli_errors, data_overrides, tiny_config

from minipretrain.errors import ConfigError, UserError
from minipretrain.train import loop
from minipretrain.train import trackers as trackers_module
from minipretrain.train.loop import train
from minipretrain.train.metrics import read_metrics

ALL = 'train.loggers=["jsonl", "tensorboard", "wandb", "swanlab"]'


@pytest.fixture(autouse=True)
def offline(tmp_path, monkeypatch):
    """Nothing reaches the network or the real home directory."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for key, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DIR": str(home / "wandb"),
                       "WANDB_CACHE_DIR": str(home / "wandb-cache"), "WANDB_CONFIG_DIR": str(home / "wandb-config"),
                       "WANDB_DATA_DIR": str(home / "wandb-data"), "SWANLAB_MODE": "offline",
                       "SWANLAB_ROOT": str(home / "swanlab"), "SWANLAB_SAVE_DIR": str(home / "swanlab")}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("SWANLAB_API_KEY", raising=False)


def test_config_keys_and_their_errors(tmp_path, capsys):
    t = tiny_config().train
    assert (t.loggers, t.project, t.run_name, t.tracker_mode) == (["jsonl"], "minipretrain", None, None)
    t = tiny_config('train.loggers=["wandb"]', "train.project=p", "train.run_name=r",
                    "train.tracker_mode=offline").train
    assert (t.loggers, t.project, t.run_name, t.tracker_mode) == (["wandb"], "p", "r", "offline")
    for override, message in {'train.loggers=["mlflow"]': "train.loggers: unknown logger 'mlflow'",
                              "train.loggers=wandb": "train.loggers: expected a list of strings",
                              "train.tracker_mode=cloud": "train.tracker_mode: unknown mode 'cloud'",
                              'train.project=""': "train.project: must not be empty"}.items():
        with pytest.raises(ConfigError, match=re.escape(message)):
            tiny_config(override)
    assert_cli_errors({"train.loggers: unknown logger 'mlflow'": ["train", "--run-dir", str(tmp_path / "r"),
                                                                  "--set", 'train.loggers=["mlflow"]']}, capsys)
    assert not (tmp_path / "r").exists()


def _leveldb_records(path: Path, ident: bytes) -> list[bytes]:
    """The records of a wandb (.wandb) or swanlab (.swanlab) file: a 7-byte header, then LevelDB log blocks."""
    data, block, records, chunk = path.read_bytes(), 32768, [], b""
    assert data[:4] == ident
    pos = 7
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            break
        chunk += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # full, or last piece
            records.append(chunk)
            chunk = b""
    return records


def wandb_run(run_file: Path) -> dict:
    """{"id", "history": {key: {step: value}}, "config", "exit_code"} of an offline wandb run file."""
    from wandb.proto import wandb_internal_pb2 as pb

    out = {"history": {}, "config": {}, "exit_code": None}
    for data in _leveldb_records(run_file, b":W&B"):
        record = pb.Record()
        record.ParseFromString(data)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            out["id"] = record.run.run_id
            out["config"].update({item.key: json.loads(item.value_json) for item in record.run.config.update})
        elif kind == "history":
            items = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            for key, value in items.items():
                out["history"].setdefault(key, {})[items["_step"]] = value
        elif kind == "config":  # config changes after the start
            out["config"].update({item.key: json.loads(item.value_json) for item in record.config.update})
        elif kind == "exit":
            out["exit_code"] = record.exit.exit_code
    return out


def swanlab_run(run_file: Path) -> dict:
    """{"id", "scalars": {key: {step: value}}, "state"} of an offline swanlab run file."""
    from swanlab.proto.swanlab.record.v1.record_pb2 import Record

    out = {"scalars": {}, "state": None}
    for data in _leveldb_records(run_file, b":SWL"):
        record = Record()
        record.ParseFromString(data)
        kind = record.WhichOneof("record_type")
        if kind == "start":
            out["id"] = record.start.id
        elif kind == "scalar":
            out["scalars"].setdefault(record.scalar.key, {})[record.scalar.step] = record.scalar.value.number
        elif kind == "finish":
            out["state"] = record.finish.state
    return out


def tensorboard_scalars(log_dir: Path) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    events.Reload()  # honours purge_step: events after a resumed run's checkpoint are dropped
    return {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}


def by_step(records: list[dict], key: str) -> dict[int, float]:
    return {r["step"]: r[key] for r in records if key in r}


@pytest.mark.slow
def test_every_record_reaches_each_tracker_and_resume_continues_their_runs(tmp_path, shakespeare, tokenizer_dir,
                                                                         monkeypatch):
    run = tmp_path / "run"
    common = [*data_overrides(shakespeare, tokenizer_dir), ALL, "train.max_steps=8", "train.save_every=4",
              "train.eval_every=4", "train.project=tests"]
    real_lr_at = loop.lr_at

    def crash_at_step_6(step, *args):
        if step == 6:
            raise RuntimeError("simulated crash")
        return real_lr_at(step, *args)

    monkeypatch.setattr(loop, "lr_at", crash_at_step_6)
    with pytest.raises(RuntimeError, match="simulated crash"):  # steps 1-6 logged, the checkpoint is at step 4
        train(tiny_config(*common), run, show_progress=False)
    ids = json.loads((run / "trackers.json").read_text())
    monkeypatch.setattr(loop, "lr_at", real_lr_at)
    train(tiny_config(*common), run, resume=True, show_progress=False)
    assert json.loads((run / "trackers.json").read_text()) == ids  # the same tracker runs, continued

    records = read_metrics(run / "metrics.jsonl")
    loss, val_loss = by_step(records, "loss"), by_step(records, "val_loss")
    assert list(loss) == list(range(1, 9)) and list(val_loss) == [0, 4, 8]

    # TensorBoard: one curve per metric, steps 5 and 6 once (purged and rewritten by the resumed run).
    scalars = tensorboard_scalars(run / "tensorboard")
    assert scalars["loss"] == pytest.approx(loss)
    assert scalars["val_loss"] == pytest.approx(val_loss)
    assert scalars["lr"] == pytest.approx(by_step(records, "lr"))
    assert set(scalars) >= {"grad_norm", "tokens", "tokens_per_s", "val_bpb", "val_perplexity"}

    # wandb, offline: one directory per session, both under the run's id; the resumed one logs from step 5.
    first, second = [wandb_run(f) for f in sorted((run / "wandb").glob("offline-run-*/run-*.wandb"))]
    assert first["id"] == second["id"] == ids["wandb"]["id"]
    assert list(first["history"]["loss"]) == [1, 2, 3, 4, 5, 6] and first["exit_code"] == 1
    assert second["history"]["loss"] == pytest.approx({s: loss[s] for s in (5, 6, 7, 8)})
    assert second["history"]["val_loss"] == pytest.approx({8: val_loss[8]}) and second["exit_code"] == 0
    assert first["history"]["val_loss"] == pytest.approx({0: val_loss[0], 4: val_loss[4]})
    assert second["config"]["train"]["max_steps"] == 8 and second["config"]["train"]["project"] == "tests"

    # SwanLab, offline: the same, in RUN/swanlog.
    from swanlab.proto.swanlab.run.v1.run_pb2 import RunState

    first, second = [swanlab_run(f) for f in sorted((run / "swanlog").glob("run-*/run-*.swanlab"))]
    assert first["id"] == second["id"] == ids["swanlab"]["id"]
    assert list(first["scalars"]["loss"]) == [1, 2, 3, 4, 5, 6]
    assert (first["state"], second["state"]) == (RunState.RUN_STATE_CRASHED, RunState.RUN_STATE_FINISHED)
    assert second["scalars"]["loss"] == pytest.approx({s: loss[s] for s in (5, 6, 7, 8)})
    assert second["scalars"]["val_bpb"] == pytest.approx({8: by_step(records, "val_bpb")[8]})


def test_missing_tracker_package_is_one_line_before_any_work(tmp_path, monkeypatch, capsys):
    for name in ("wandb", "swanlab", "tensorboard"):
        monkeypatch.setitem(sys.modules, name, None)  # `import name` now raises ImportError
    bad = {}
    for name in ("wandb", "swanlab", "tensorboard"):
        message = f"train.loggers: \"{name}\" needs the {name} package: pip install 'minipretrain[{name}]'"
        bad[message] = ["train", "--run-dir", str(tmp_path / name), "--set", f'train.loggers=["jsonl", "{name}"]']
    assert_cli_errors(bad, capsys)
    assert not any((tmp_path / name).exists() for name in ("wandb", "swanlab", "tensorboard"))


def test_tracker_that_cannot_start_fails_before_step_0(tmp_path, shakespeare, tokenizer_dir, monkeypatch, capsys):
    import wandb

    def no_login(**kwargs):
        raise wandb.errors.UsageError("api_key not configured (no-tty).\ncall wandb.login(key=[your_api_key])")

    monkeypatch.setattr(wandb, "init", no_login)
    run = tmp_path / "run"
    overrides = [*data_overrides(shakespeare, tokenizer_dir), 'train.loggers=["tensorboard", "wandb"]']
    with pytest.raises(UserError, match=re.escape('train.loggers: "wandb" failed to start: api_key not configured')):
        train(tiny_config(*overrides), run, show_progress=False)
    assert not (run / "metrics.jsonl").exists() and not (run / "checkpoints").exists()
    argv = ["train", "--run-dir", str(tmp_path / "cli"), "--no-progress"]
    argv += [arg for value in overrides for arg in ("--set", value)]
    assert_cli_errors({"or --set train.tracker_mode=offline": argv}, capsys)


def test_tracker_failing_mid_run_is_warned_once_and_training_goes_on(tmp_path, shakespeare, tokenizer_dir,
                                                                    monkeypatch, capsys):
    real_log = trackers_module.TensorBoardTracker.log

    def flaky(self, values, step):
        if step >= 3:
            raise OSError("disk full")
        real_log(self, values, step)

    monkeypatch.setattr(trackers_module.TensorBoardTracker, "log", flaky)
    run = tmp_path / "run"
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(run / "tensorboard")) as stale:  # events of an earlier start that never saved a checkpoint
        stale.add_scalar("loss", 99.0, 5)
    summary = train(tiny_config(*data_overrides(shakespeare, tokenizer_dir), 'train.loggers=["tensorboard"]'), run,
                    show_progress=False)
    assert summary["steps"] == 6
    assert list(by_step(read_metrics(run / "metrics.jsonl"), "loss")) == [1, 2, 3, 4, 5, 6]
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert warnings == ["warning: tensorboard failed at step 3 (OSError: disk full); it is off for the rest of this "
                        "run (metrics.jsonl has every record)"]
    assert list(tensorboard_scalars(run / "tensorboard")["loss"]) == [1, 2]  # and none of the stale ones


def test_nested_records_are_flattened_and_step_is_the_x_axis():
    record = {"step": 5, "loss": 2.5, "tokens": 640, "val_loss_by_source": {"web": 3.0, "code": 2.0}, "note": "x",
              "flag": True}
    assert trackers_module.scalars(record) == {"loss": 2.5, "tokens": 640, "val_loss_by_source/web": 3.0,
                                               "val_loss_by_source/code": 2.0}


def test_start_passes_project_name_mode_and_the_saved_id(tmp_path, monkeypatch):
    import swanlab
    import wandb

    calls = {}

    class FakeRun:
        id = "abc123"

    def fake_init(name):
        def init(**kwargs):
            calls[name] = kwargs
            return FakeRun()
        return init

    monkeypatch.setattr(wandb, "init", fake_init("wandb"))
    monkeypatch.setattr(swanlab, "init", fake_init("swanlab"))
    run = tmp_path / "my-run"
    run.mkdir()
    cfg = tiny_config('train.loggers=["wandb", "swanlab"]', "train.tracker_mode=offline", "train.project=p")
    trackers_module.Trackers().start(cfg, run)
    assert {k: calls["wandb"][k] for k in ("project", "name", "mode", "id", "resume", "dir")} == \
        {"project": "p", "name": "my-run", "mode": "offline", "id": None, "resume": None, "dir": str(run)}
    assert calls["wandb"]["config"] == cfg.to_dict()
    assert {k: calls["swanlab"][k] for k in ("project", "name", "mode", "id", "resume", "log_dir")} == \
        {"project": "p", "name": "my-run", "mode": "offline", "id": None, "resume": None,
         "log_dir": str(run / "swanlog")}
    assert json.loads((run / "trackers.json").read_text()) == {"wandb": {"id": "abc123"}, "swanlab": {"id": "abc123"}}

    (run / "trackers.json").write_text(json.dumps({"wandb": {"id": "w1"}, "swanlab": {"id": "s1"}}))
    trackers_module.Trackers().start(tiny_config('train.loggers=["wandb", "swanlab"]', "train.run_name=named"), run,
                                     step=4)
    assert (calls["wandb"]["id"], calls["wandb"]["resume"], calls["wandb"]["mode"]) == ("w1", "allow", None)
    assert (calls["swanlab"]["id"], calls["swanlab"]["resume"], calls["swanlab"]["name"]) == ("s1", "allow", "named")
