"""benchmarks/throughput.py --presets: every variant of every preset timed, the JSON and the Markdown table written;
its bad flags refused. On the CPU here in every run (a tiny model), and on CUDA where a GPU is present."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import DEVICES, TINY_MODEL, load_benchmark

from minipretrain.train.metrics import gpu_peak_tflops

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def throughput():
    return load_benchmark("throughput")


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
def test_presets_mode_times_every_variant(throughput, tmp_path, device, capsys):
    out = tmp_path / "presets.json"
    tiny_model = [arg for key in TINY_MODEL for arg in ("--set", key)]
    # eager and compiled, each without and with document masks (FlexAttention on CUDA, where heads >= 16 wide)
    args = ["--presets", "tiny", *tiny_model, "--set", "model.hidden_size=64", "--device", device, "--batch-size", "2",
            "--seq-len", "64", "--warmup", "1", "--steps", "2", "--block", "1", "--doc-len", "16", "--json", str(out)]
    if device == "cpu" or gpu_peak_tflops(torch.cuda.get_device_name(), torch.bfloat16) is None:
        args += ["--peak-tflops", "1.0"]  # for MFU on a CPU or a GPU the table does not know
    result = throughput.main(args)
    written = json.loads(out.read_text())
    assert written["presets"][0]["variants"] == result["presets"][0]["variants"]
    (preset,) = written["presets"]
    assert preset["preset"] == "tiny" and (preset["batch_size"], preset["seq_len"]) == (2, 64)
    assert preset["optimizer"] == "muon"  # the preset's own optimizer is what is timed, and it is recorded
    assert [v["name"] for v in preset["variants"]] == ["eager", "eager+mask", "compiled", "compiled+mask"]
    for v in preset["variants"]:
        assert v["tokens_per_s"] > 0 and v["median_s"] > 0 and 0 < v["mfu"] < 1, v["name"]
        assert v["peak_memory_bytes"] > 0 and len(v["warmup_s"]) == 1 and len(v["block_mean_step_s"]) == 2
    assert set(preset["document_mask_cost"]) == {"eager", "compiled"}
    assert written["device"].startswith(device) and written["torch"] == torch.__version__

    table = capsys.readouterr().out.split("| preset | variant | tokens/s | step ms | peak memory | MFU |")
    header, rows = table[0].rstrip().splitlines()[-1], table[1].strip().splitlines()[1:5]
    assert f"torch {torch.__version__}" in header and written["date"] in header and written["hardware"] in header
    for row, v in zip(rows, preset["variants"], strict=True):
        assert row.startswith(f"| tiny | {v['name']} | {v['tokens_per_s']:,.0f} | ") and row.endswith("% |")


def test_presets_mode_eager_on_the_cpu_without_a_peak(throughput, tmp_path, capsys):
    tiny_model = [arg for key in TINY_MODEL for arg in ("--set", key)]
    result = throughput.main(["--presets", "tiny", *tiny_model, "--device", "cpu", "--variants", "eager,eager+mask",
                              "--batch-size", "2", "--seq-len", "32", "--warmup", "1", "--steps", "2",
                              "--json", str(tmp_path / "eager.json")])
    variants = result["presets"][0]["variants"]
    assert [v["name"] for v in variants] == ["eager", "eager+mask"]
    assert all(v["tokens_per_s"] > 0 and v["mfu"] is None for v in variants)
    assert "| tiny | eager+mask |" in capsys.readouterr().out  # MFU n/a: no peak known for a CPU


@pytest.mark.parametrize("argv, message", [
    (["--presets", "tiny", "--variants", "eager,fast"], "--variants: unknown fast"),
    (["--presets", "tiny", "--compile"], "--presets compares eager and compiled itself"),
    (["--presets", "tiny", "--compare-dtype"], "--presets compares eager and compiled itself"),
    (["--presets", "tiny", "--doc-len", "0"], "--doc-len must be >= 1"),
    (["--config", "configs/tiny.toml", "--presets", "tiny"], "not allowed with argument"),
    ([], "one of the arguments --config --presets is required"),
])
def test_bad_flags_are_refused(throughput, argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        throughput.main(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_compare_optimizer_times_fused_foreach_and_muon(throughput, tmp_path, capsys):
    out = tmp_path / "optim.json"
    tiny_model = [arg for key in TINY_MODEL for arg in ("--set", key)]
    result = throughput.main(["--config", "configs/tiny.toml", *tiny_model, "--device", "cpu", "--dtype", "float32",
                              "--batch-size", "2", "--seq-len", "32", "--warmup", "1", "--steps", "2", "--block", "1",
                              "--compare-optimizer", "--peak-tflops", "1.0", "--json", str(out)])
    assert [r["optimizer"] for r in result["runs"]] == ["fused", "foreach", "muon"]
    assert all(r["optimizer_median_ms"] > 0 and len(r["step_times_s"]) == 2 for r in result["runs"])
    assert json.loads(out.read_text())["runs"][2]["optimizer"] == "muon"
    assert "| muon |" in capsys.readouterr().out
    # the labels name what steps: Muon beside AdamW for "muon", one AdamW kernel for the others
    from minipretrain.config import load_config
    from minipretrain.model import MiniMind
    from minipretrain.train.optim import optimizer_list

    cfg = load_config(None, [*TINY_MODEL, "train.seq_len=32"])
    model = MiniMind(cfg.model)
    muon, _ = throughput.make_optimizer(model, cfg, "cpu", "muon")
    assert [type(o).__name__ for o in optimizer_list(muon)] == ["Muon", "AdamW"]
    foreach, _ = throughput.make_optimizer(model, cfg, "cpu", "foreach")
    assert isinstance(foreach, torch.optim.AdamW) and foreach.defaults["foreach"]
