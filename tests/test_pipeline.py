"""Pipeline parallelism on CPU: 2 (and 2 x 2) processes under torchrun with the gloo backend, each schedule against
one process; checkpoints that move between pipeline and plain layouts; config refusals."""

import time

import pytest
import torch
from test_distributed import FAILING_RANK, _assert_same_steps, _config, _steps, torchrun

from minipretrain.config import pipeline_shape
from minipretrain.errors import ConfigError
from minipretrain.parallel.pipeline import layer_split
from minipretrain.train.loop import train
from minipretrain.train.metrics import read_metrics

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built")

FOUR_LAYERS = ("model.num_hidden_layers=4",)  # 2 ranks x 2 stages each for interleaved 1F1B


def _vals(run) -> dict[int, float]:
    return {r["step"]: r["val_loss"] for r in read_metrics(run / "metrics.jsonl") if "val_loss" in r}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, shakespeare, tokenizer_dir):
    """One process, 4 layers, batch 4 x 2 micro-steps, 6 steps, checkpoints and validation at 3 and 6; and the
    same with document masking."""
    tmp = tmp_path_factory.mktemp("pp_reference")
    runs = {}
    for name, extra in (("plain", ()), ("masked", ("data.document_mask=true",))):
        cfg, _ = _config(tmp, shakespeare, tokenizer_dir, *FOUR_LAYERS, *extra)
        train(cfg, tmp / name, show_progress=False)
        runs[name] = tmp / name
    return runs


@pytest.mark.parametrize("schedule, extra", [
    ("gpipe", ()),
    ("1f1b", ()),
    ("interleaved_1f1b", ("data.document_mask=true",)),  # 4 stages on 2 ranks; doc_ids reach every stage
])
def test_two_stages_equal_one_process(tmp_path, shakespeare, tokenizer_dir, reference, schedule, extra):
    _, config = _config(tmp_path, shakespeare, tokenizer_dir, *FOUR_LAYERS, *extra,
                        "parallel.pipeline_parallel=2", f"parallel.pp_schedule={schedule}")
    result = torchrun(2, "train", "--config", str(config), "--run-dir", str(tmp_path / "run"), "--no-progress")
    single = reference["masked" if extra else "plain"]
    _assert_same_steps(_steps(tmp_path / "run"), _steps(single), range(1, 7))
    for step, val in _vals(single).items():
        assert _vals(tmp_path / "run")[step] == pytest.approx(val, abs=1e-5), step
    assert f"pipeline parallel x 2 ({schedule})" in result.stderr + result.stdout
    assert "no sample under pipeline parallelism" in result.stderr + result.stdout


@pytest.mark.parametrize("schedule, mode", [("gpipe", "ddp"), ("1f1b", "fsdp"), ("interleaved_1f1b", "ddp")])
def test_two_stages_times_two_replicas_equal_one_process(tmp_path, shakespeare, tokenizer_dir, reference, schedule,
                                                         mode):
    _, config = _config(tmp_path, shakespeare, tokenizer_dir, *FOUR_LAYERS, "train.batch_size=2",
                        "parallel.pipeline_parallel=2", f"parallel.pp_schedule={schedule}", f"parallel.mode={mode}")
    result = torchrun(4, "train", "--config", str(config), "--run-dir", str(tmp_path / "run"), "--no-progress")
    _assert_same_steps(_steps(tmp_path / "run"), _steps(reference["plain"]), range(1, 7))
    assert f"{mode} data parallel x 2, tensor parallel x 1, pipeline parallel x 2" in result.stderr + result.stdout


def test_two_stages_times_two_tensor_parallel_ranks_equal_one_process(tmp_path, shakespeare, tokenizer_dir,
                                                                      reference):
    _, config = _config(tmp_path, shakespeare, tokenizer_dir, *FOUR_LAYERS, "parallel.pipeline_parallel=2",
                        "parallel.tensor_parallel=2")
    result = torchrun(4, "train", "--config", str(config), "--run-dir", str(tmp_path / "run"), "--no-progress")
    _assert_same_steps(_steps(tmp_path / "run"), _steps(reference["plain"]), range(1, 7))
    assert "tensor parallel x 2, pipeline parallel x 2" in result.stderr + result.stdout


def test_a_masked_lm_on_padded_rows_equals_one_process(tmp_path, shakespeare, tokenizer_dir):
    """Padded rows carry doc_ids only in micro-batches that pad: the pipeline gives the others a one-document mask,
    so bidirectional attention never sees padding, as in one process."""
    extra = (*FOUR_LAYERS, "train.objective=mlm", "data.layout=padded", "train.eval_every=3")
    cfg, _ = _config(tmp_path, shakespeare, tokenizer_dir, *extra)
    train(cfg, tmp_path / "one", show_progress=False)
    _, config = _config(tmp_path, shakespeare, tokenizer_dir, *extra, "parallel.pipeline_parallel=2")
    torchrun(2, "train", "--config", str(config), "--run-dir", str(tmp_path / "pp"), "--no-progress")
    _assert_same_steps(_steps(tmp_path / "pp"), _steps(tmp_path / "one"), range(1, 7))
    for step, val in _vals(tmp_path / "one").items():
        assert _vals(tmp_path / "pp")[step] == pytest.approx(val, abs=1e-5), step


def test_muon_on_two_stages_equals_one_process(tmp_path, shakespeare, tokenizer_dir):
    """Each stage's Muon updates its own blocks' whole matrices; the tied embedding (AdamW) is summed across the end
    stages as with AdamW. (Newton-Schulz runs in bf16: agreement within 1e-4.)"""
    extra = (*FOUR_LAYERS, "optim.name=muon")
    cfg, _ = _config(tmp_path, shakespeare, tokenizer_dir, *extra)
    train(cfg, tmp_path / "one", show_progress=False)
    _, config = _config(tmp_path, shakespeare, tokenizer_dir, *extra, "parallel.pipeline_parallel=2")
    torchrun(2, "train", "--config", str(config), "--run-dir", str(tmp_path / "pp"), "--no-progress")
    two, one = _steps(tmp_path / "pp"), _steps(tmp_path / "one")
    for step in range(1, 7):
        assert two[step]["loss"] == pytest.approx(one[step]["loss"], abs=1e-4), step


def test_pipeline_checkpoint_resumes_on_one_process_and_back(tmp_path, shakespeare, tokenizer_dir, reference):
    _, config = _config(tmp_path, shakespeare, tokenizer_dir, *FOUR_LAYERS, "parallel.pipeline_parallel=2")
    torchrun(2, "train", "--config", str(config), "--run-dir", str(tmp_path / "pp"), "--no-progress")
    assert sorted(p.name for p in (tmp_path / "pp" / "checkpoints" / "step_000003" / "dcp").iterdir()) == \
        [".metadata", "__0_0.distcp", "__1_0.distcp"]  # each stage wrote its own layers
    cfg, _ = _config(tmp_path, shakespeare, tokenizer_dir, *FOUR_LAYERS)
    train(cfg, tmp_path / "one", resume=str(tmp_path / "pp" / "checkpoints" / "step_000003"), show_progress=False)
    _assert_same_steps(_steps(tmp_path / "one"), _steps(reference["plain"]), range(4, 7))
    # and a one-process checkpoint continues on two stages
    torchrun(2, "train", "--config", str(config), "--run-dir", str(tmp_path / "back"), "--no-progress",
             "--resume", str(reference["plain"] / "checkpoints" / "step_000003"))
    _assert_same_steps(_steps(tmp_path / "back"), _steps(reference["plain"]), range(4, 7))


def test_a_failing_stage_ends_the_job(tmp_path, shakespeare, tokenizer_dir):
    _, config = _config(tmp_path, shakespeare, tokenizer_dir, *FOUR_LAYERS, "train.max_steps=50",
                        "parallel.pipeline_parallel=2")
    script = tmp_path / "failing.py"
    script.write_text(FAILING_RANK)
    start = time.monotonic()
    result = torchrun(2, "raise", "train", "--config", str(config), "--run-dir", str(tmp_path / "run"),
                      "--no-progress", script=[str(script)], timeout=180, check=False)
    assert result.returncode != 0
    assert time.monotonic() - start < 120  # the stage waiting for its peer's activations does not hang
    assert "injected failure on rank 1" in result.stderr


def test_layer_split_is_even_and_ordered():
    assert layer_split(8, 2) == [range(0, 4), range(4, 8)]
    assert layer_split(7, 3) == [range(0, 3), range(3, 5), range(5, 7)]
    assert [len(r) for r in layer_split(16, 8)] == [2] * 8


@pytest.mark.parametrize("overrides, message", [
    (("parallel.pp_schedule=zb",), "parallel.pp_schedule: unknown schedule"),
    (("parallel.pp_stages_per_rank=2",), "1f1b runs one stage per rank"),
    (("parallel.pp_schedule=interleaved_1f1b", "parallel.pp_stages_per_rank=1"), "at least 2 stages per rank"),
    (("parallel.pipeline_parallel=4",), "4 stages .* need at least as many layers"),
    (("parallel.pp_microbatches=3",), "3 micro-batches do not divide the 8 rows"),
    (("train.grad_accum=1",), "1f1b needs at least one micro-batch per stage"),
    (("model.moe=true",), "model.moe: a mixture of experts does not run under pipeline parallelism"),
    (("parallel.mode=fsdp", "parallel.cpu_offload=true"), "parallel.cpu_offload: does not combine"),
    (("parallel.pp_microbatches=0",), r"parallel.pp_microbatches: must be >= 1"),
    (("parallel.pp_stages_per_rank=0",), r"parallel.pp_stages_per_rank: must be >= 1"),
])
def test_impossible_pipelines_are_refused(overrides, message):
    from conftest import tiny_config

    with pytest.raises(ConfigError, match=message):
        tiny_config("train.grad_accum=2", "parallel.pipeline_parallel=2", *overrides)


def test_pipeline_defaults_and_one_process_refusal(monkeypatch):
    from conftest import tiny_config

    from minipretrain.parallel import init_distributed

    cfg = tiny_config("train.grad_accum=4", *FOUR_LAYERS, "parallel.pipeline_parallel=2",
                      "parallel.pp_schedule=interleaved_1f1b")
    assert pipeline_shape(cfg.parallel, cfg.train.grad_accum) == (2, 4)  # 2 stages per rank, grad_accum micro
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(ConfigError, match="pipeline_parallel=2 needs that many processes"):
        init_distributed(cfg.parallel, "cpu")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ConfigError, match=r"parallel\.pipeline_parallel=2 does not divide the 3 processes"):
        init_distributed(cfg.parallel, "cpu")
    assert not torch.distributed.is_initialized()


def test_bubble_benchmark_measures_every_schedule(tmp_path):
    from conftest import BENCHMARKS, load_benchmark

    bench = load_benchmark("distributed")
    result = bench.main(["--pipeline", "--config", str(BENCHMARKS.parent / "configs" / "tiny.toml"), "--microbatches",
                         "2", "--steps", "1", "--warmup", "0", "--batch-size", "1", "--seq-len", "32",
                         "--set", "model.vocab_size=512", "--json", str(tmp_path / "bubble.json")])
    rows = {row["schedule"]: row for row in result["rows"]}
    assert set(rows) == {"gpipe", "1f1b", "interleaved_1f1b"}
    assert rows["gpipe"]["theoretical_bubble"] == pytest.approx(1 / 3)
    assert rows["interleaved_1f1b"]["theoretical_bubble"] == pytest.approx(1 / 5)  # v = 2 stages per rank
    assert all(row["pipeline_step_s"] > 0 and row["measured_bubble"] < 1 for row in rows.values())
    assert (tmp_path / "bubble.json").is_file()
