import json
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_cli_errors, data_overrides, tiny_config

from minipretrain import plots
from minipretrain.cli import main
from minipretrain.train.loop import train
from minipretrain.train.metrics import read_metrics


@pytest.fixture(scope="module")
def run(shakespeare, tokenizer_dir, tmp_path_factory) -> Path:
    """A real 6-step run with validation at steps 0, 3 and 6 and a checkpoint at step 3."""
    run_dir = tmp_path_factory.mktemp("plots") / "run"
    cfg = tiny_config(*data_overrides(shakespeare, tokenizer_dir), "train.eval_every=3", "train.save_every=3")
    train(cfg, run_dir, show_progress=False)
    return run_dir


def column(records: list[dict], key: str, x: str = "step") -> tuple[list, list]:
    rows = [r for r in records if key in r]
    return [r[x] for r in rows], [r[key] for r in rows]


def test_series_are_the_metrics_file(run):
    records = read_metrics(run / "metrics.jsonl")
    data = plots.collect({"run": records})
    for panel, (field, _) in plots.PANELS.items():
        xs, ys = data[panel]["run"]
        assert (xs.tolist(), ys.tolist()) == column(records, field), panel
    assert data["val_loss"]["run"][0].tolist() == [0, 3, 6]
    # Against tokens: training lines carry theirs; validation lines take those of their step (0 at step 0).
    by_tokens = plots.collect({"run": records}, x="tokens")
    assert by_tokens["train_loss"]["run"][0].tolist() == column(records, "loss", "tokens")[0]
    tokens_at = {r["step"]: r["tokens"] for r in records if "tokens" in r}
    assert by_tokens["val_bpb"]["run"][0].tolist() == [0, tokens_at[3], tokens_at[6]]


def test_figure_lines_hold_the_metrics(run):
    records = read_metrics(run / "metrics.jsonl")
    fig = plots.draw(plots.collect({"run": records}), ["run"])
    axes = fig.get_axes()
    assert [ax.get_title() for ax in axes] == [title for _, title in plots.PANELS.values()]
    for ax, (panel, (field, _)) in zip(axes, plots.PANELS.items(), strict=True):
        xs, ys = column(records, field)
        lines = ax.get_lines()
        assert lines[0].get_xdata().tolist() == xs and lines[0].get_ydata().tolist() == ys, panel
        if panel == "train_loss":  # raw (light) and smoothed
            assert lines[0].get_alpha() < 1
            assert lines[1].get_ydata().tolist() == plots.smooth(np.array(ys)).tolist()
    assert [t.get_text() for t in axes[0].get_legend().get_texts()] == ["run"]


def test_smoothing_is_an_ema_started_at_the_first_value():
    assert plots.smooth(np.array([3.0, 1.0, 2.0])).tolist() == [3.0, 1.0, 2.0]  # short runs: raw
    values = np.array([10.0] + [0.0] * 199)  # span 4: alpha 0.4
    smoothed = plots.smooth(values)
    assert smoothed[0] == 10.0 and smoothed[1] == pytest.approx(6.0) and smoothed[-1] < 1e-6


def test_train_writes_a_png_of_sane_size(run):
    from matplotlib.image import imread

    image = imread(run / "plots.png")
    height, width = image.shape[:2]
    assert 800 <= width <= 2000 and 400 <= height <= 1200
    assert image.std() > 0.01  # not blank
    assert not list(run.glob(".*tmp*"))  # written under a temporary name, then renamed


def test_cli_plot_one_and_several_runs(run, tmp_path, capsys, monkeypatch):
    (run / "plots.png").unlink()
    main(["plot", str(run)])
    assert capsys.readouterr().out.strip() == f"wrote {run / 'plots.png'}"
    assert (run / "plots.png").is_file()

    # A second run with the validation still to come, and one with the same directory name elsewhere.
    records = read_metrics(run / "metrics.jsonl")
    other, twin = tmp_path / "other", tmp_path / "b" / "run"
    for directory, kept in ((other, [r for r in records if "loss" in r]), (twin, records)):
        directory.mkdir(parents=True)
        (directory / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))
    monkeypatch.chdir(tmp_path)
    main(["plot", str(run), str(other), str(twin), "--x", "tokens"])
    assert (tmp_path / "plots.png").is_file()  # several runs: ./plots.png
    runs = plots.load_runs([run, other, twin])
    assert list(runs) == [str(run), "other", str(twin)]
    fig = plots.draw(plots.collect(runs, "tokens"), list(runs), "tokens")
    val = fig.get_axes()[1]
    assert [t.get_text() for t in fig.get_axes()[0].get_legend().get_texts()] == list(runs)
    assert len(val.get_lines()) == 2 and val.get_xlabel() == "tokens"  # `other` has no validation lines
    main(["plot", str(other), "--out", str(tmp_path / "other.png")])
    no_data = [ax.texts[0].get_text() for ax in plots.draw(plots.collect({"other": runs["other"]}), ["other"])
               .get_axes() if ax.texts]
    assert no_data == ["no data", "no data"]  # validation loss and bits per byte


def test_plot_errors_are_one_line(run, tmp_path, capsys, monkeypatch):
    (tmp_path / "empty").mkdir()
    assert_cli_errors({
        "has no metrics.jsonl: give a run directory": ["plot", str(tmp_path / "empty")],
        f"--out {tmp_path} is a directory": ["plot", str(run), "--out", str(tmp_path)],
        "expected a .png file name": ["plot", str(run), "--out", str(tmp_path / "p.txt")],
        "does not exist": ["plot", str(run), "--out", str(tmp_path / "nowhere" / "p.png")],
    }, capsys)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert_cli_errors({"plot needs matplotlib: pip install 'minipretrain[plot]'": ["plot", str(run)]}, capsys)


def test_training_without_matplotlib_or_with_a_failing_plot_goes_on(shakespeare, tokenizer_dir, tmp_path,
                                                                      monkeypatch, capsys):
    cfg = tiny_config(*data_overrides(shakespeare, tokenizer_dir), "train.max_steps=2", "data.val_fraction=0")
    with monkeypatch.context() as patch:
        patch.setitem(sys.modules, "matplotlib", None)
        assert train(cfg, tmp_path / "a", show_progress=False)["steps"] == 2
    assert not (tmp_path / "a" / "plots.png").exists()

    def broken(*args):
        raise ValueError("bad data")

    monkeypatch.setattr(plots, "draw", broken)
    capsys.readouterr()
    assert train(cfg, tmp_path / "b", show_progress=False)["steps"] == 2
    assert f"warning: could not write {tmp_path / 'b' / 'plots.png'} (ValueError: bad data)" in capsys.readouterr().err
