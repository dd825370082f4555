"""Fill-in-the-middle against causal LM on held-out Python functions: what FIM training buys, and what it costs.

    python benchmarks/fim.py  # the tiny preset on ../shared/data/cpython-3.11.7-stdlib-code.jsonl
    python benchmarks/fim.py --steps 300 --functions 400

Two runs of the same preset, seed, data and tokenizer, for the same steps: train.objective=clm and =fim. Then, on
functions of the held-out files (the val split of the prepared corpus, never trained on):
  (a) loss on middles: each function cut at two uniformly random characters into prefix / middle / suffix, as in
      training. FIM: the PSM prompt `<|fim_prefix|> P <|fim_suffix|> S <|fim_middle|>` then M; CLM: P then M, the
      best it can do (it has no way to read the suffix). Mean cross-entropy per middle token; the middle's tokens are
      the same in both.
  (b) single-line infilling: one random non-blank body line of each function is the middle. FIM: the PSM prompt;
      CLM: the prefix; greedy decoding, the first line of the output against the true line (both stripped).
  (c) what FIM costs: the left-to-right validation loss of both runs on the held-out files (plain rows).
The prompts are those `minipretrain generate` builds (`--fim-prefix/--fim-suffix` for FIM, `--prompt` for CLM).
Prints a table and writes benchmarks/results/fim.json.
"""

from __future__ import annotations

import argparse
import ast
import json
import platform
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from minipretrain.config import load_config
from minipretrain.data.objectives import fim_prompt
from minipretrain.data.shards import PrepareOptions, is_held_out, prepare
from minipretrain.data.sources import iter_documents
from minipretrain.model import KVCache
from minipretrain.tokenizer import train_tokenizer
from minipretrain.train.checkpoint import load_model_from_checkpoint
from minipretrain.train.loop import train

ROOT = Path(__file__).resolve().parents[1]
CODE = ROOT.parent / "shared" / "data" / "cpython-3.11.7-stdlib-code.jsonl"
RESULTS = ROOT / "benchmarks" / "results"
OBJECTIVES = ("clm", "fim")


def held_out_functions(path: Path, val_fraction: float, max_chars: int, limit: int, seed: int) -> list[str]:
    """`limit` functions (methods dedented) of 3+ lines and at most max_chars, drawn at random from the documents
    that `prepare` holds out with val_fraction."""
    functions = []
    for i, text in enumerate(iter_documents(str(path))):
        if not is_held_out(i, val_fraction):
            continue
        try:
            tree = ast.parse(text)
        except SyntaxError:  # the stdlib has a few files of deliberately bad syntax (test data)
            continue
        lines = text.splitlines(keepends=True)
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                source = textwrap.dedent("".join(lines[node.lineno - 1: node.end_lineno]))
                if source.count("\n") >= 3 and len(source) <= max_chars:
                    functions.append(source)
    order = np.random.default_rng(seed).permutation(len(functions))
    return [functions[k] for k in order[:limit]]


def random_cuts(functions: list[str], seed: int, per_function: int = 4) -> list[tuple[str, str, str]]:
    """(prefix, middle, suffix) at two uniformly random characters, as FIM training cuts documents; several cuts
    of each function."""
    rng = np.random.default_rng(seed)
    tasks = []
    for text in functions:
        for _ in range(per_function):
            a, b = sorted(rng.integers(0, len(text) + 1, size=2))
            tasks.append((text[:a], text[a:b], text[b:]))
    return tasks


def line_cuts(functions: list[str]) -> list[tuple[str, str, str]]:
    """(prefix, middle, suffix) where the middle is a newline and one non-blank body line: every such line of every
    function. The cuts sit before newlines, where a byte-level BPE token starts anyway (a newline and the next
    line's indentation are one token in code): a prompt ending in a bare newline token would be one the models
    never saw."""
    tasks = []
    for text in functions:
        lines = text.split("\n")
        for k in range(1, len(lines)):
            if lines[k].strip():
                tasks.append(("\n".join(lines[:k]), "\n" + lines[k], "\n" + "\n".join(lines[k + 1:])))
    return tasks


def prompt_ids(tokenizer, layout: str, prefix: str, suffix: str) -> list[int]:
    """What the model reads before the middle. psm: what `generate --fim-prefix/--fim-suffix` builds; spm: the
    suffix first, so that the middle continues the prefix directly; prefix: `generate --prompt` for a causal LM
    (eos alone when empty, a document start)."""
    if layout == "psm":
        return fim_prompt(tokenizer, prefix, suffix)
    if layout == "spm":
        return ([tokenizer.fim_prefix_id, tokenizer.fim_suffix_id] + tokenizer.encode(suffix)
                + [tokenizer.fim_middle_id] + tokenizer.encode(prefix))
    return tokenizer.encode(prefix) or [tokenizer.eos_id]


@torch.no_grad()
def middle_loss(model, tokenizer, layout: str, tasks) -> float:
    """Mean cross-entropy (nats) per middle token, the middle's tokens following the objective's prompt."""
    model.eval()
    nats, count = 0.0, 0
    for prefix, middle, suffix in tasks:
        target = tokenizer.encode(middle)
        if not target:
            continue
        context = prompt_ids(tokenizer, layout, prefix, suffix)
        ids = torch.tensor([context + target])
        logits = model(ids).logits[0, len(context) - 1: -1].float()
        nats += F.cross_entropy(logits, torch.tensor(target), reduction="sum").item()
        count += len(target)
    return nats / max(count, 1)


@torch.no_grad()
def next_line(model, tokenizer, prompt: list[int], max_new_tokens: int) -> str | None:
    """The line that greedy decoding (with a KV cache, as `generate --temperature 0`) starts with its first token,
    a newline: the text up to the next newline or eos. None when the output does not start a new line."""
    model.eval()
    cache, ids, new = KVCache(), torch.tensor([prompt]), []
    for _ in range(max_new_tokens):
        token = int(model(ids, cache=cache).logits[0, -1].argmax())
        if token == tokenizer.eos_id:
            break
        new.append(token)
        if tokenizer.decode(new).count("\n") >= 2:
            break
        ids = torch.tensor([[token]])
    text = tokenizer.decode(new)
    return text.split("\n")[1] if text.startswith("\n") else None


def line_exact_match(model, tokenizer, layout: str, tasks) -> float:
    """Share of lines whose greedy infill, stripped, equals the true line, stripped. Decoding stops 8 tokens past
    the true line's length: a line not finished by then is not the true one."""
    hits = 0
    for prefix, line, suffix in tasks:
        budget = len(tokenizer.encode(line)) + 8
        predicted = next_line(model, tokenizer, prompt_ids(tokenizer, layout, prefix, suffix), budget)
        hits += predicted is not None and predicted.strip() == line.strip()
    return hits / len(tasks)


def prepare_corpus(path: Path, out: Path, vocab_size: int, val_fraction: float, tokenizer_chars: int) -> Path:
    """A tokenizer trained on the first tokenizer_chars of the training files, and the corpus prepared with it."""
    def texts():
        total = 0
        for i, text in enumerate(iter_documents(str(path))):
            if total >= tokenizer_chars:
                return
            if not is_held_out(i, val_fraction):
                total += len(text)
                yield text

    tokenizer = train_tokenizer(texts(), vocab_size, show_progress=False)
    prepare([str(path)], tokenizer, out, PrepareOptions(val_fraction=val_fraction, workers=1), show_progress=False,
            overwrite=True, log=lambda message: None)
    return out


def run_overrides(steps: int, seed: int, extra: list[str] = ()) -> list[str]:
    """The --set values of both runs: configs/tiny.toml for `steps`, validating and saving only at the end."""
    return [f"train.max_steps={steps}", f"train.seed={seed}", "train.eval_every=0", "train.eval_batches=8",
            "train.sample_every=0", "train.save_every=0", *extra]


def train_both(prepared: Path, runs: Path, overrides: list[str], config: str = "configs/tiny.toml") -> dict:
    """Train clm and fim with the same everything else; {objective: summary}. A finished run of the same config
    already in `runs` (its summary.json written) is reused."""
    summaries = {}
    for objective in OBJECTIVES:
        data = f"data.path={json.dumps(str(prepared.resolve()))}"
        cfg = load_config(ROOT / config, [data, f"train.objective={objective}", *overrides])
        run = runs / objective
        if (run / "summary.json").is_file() and load_config(run / "config.toml") == cfg:
            summaries[objective] = json.loads((run / "summary.json").read_text())
        else:
            summaries[objective] = train(cfg, run, overwrite=True, show_progress=False)
    return summaries


# What each run is scored with: the causal LM reads the prefix; the FIM model the PSM prompt (and SPM, reported too).
LAYOUTS = {"clm": ("clm", "prefix"), "fim": ("fim", "psm"), "fim_spm": ("fim", "spm")}


def compare(runs: Path, functions: list[str], seed: int, layouts=tuple(LAYOUTS), cuts_per_function: int = 4) -> dict:
    """Loss on middles and single-line exact match of each run's final checkpoint, for the `layouts` (LAYOUTS'
    names)."""
    random_tasks, line_tasks = random_cuts(functions, seed, cuts_per_function), line_cuts(functions)
    scores = {}
    for name in layouts:
        objective, layout = LAYOUTS[name]
        model, tokenizer, _, _ = load_model_from_checkpoint(runs / objective)
        scores[name] = {"middle_loss": middle_loss(model, tokenizer, layout, random_tasks),
                        "line_exact_match": line_exact_match(model, tokenizer, layout, line_tasks)}
    return scores


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
        return f"{fields['Model name'].strip()}, {fields['CPU(s)'].strip()} CPUs"
    except (OSError, KeyError):
        return platform.processor() or "unknown CPU"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(CODE))
    p.add_argument("--config", default="configs/tiny.toml",
                   help="the preset both runs train (e.g. configs/minimind2-26m.toml on a GPU)")
    p.add_argument("--steps", type=int, default=2400, help="training steps of each run")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="more overrides of the preset for both runs")
    p.add_argument("--functions", type=int, default=300, help="held-out functions scored")
    p.add_argument("--max-chars", type=int, default=600, help="longest function scored (fits the training rows)")
    p.add_argument("--val-fraction", type=float, default=0.05, help="share of files held out")
    p.add_argument("--tokenizer-chars", type=int, default=4_000_000, help="characters the tokenizer trains on")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--runs", default=None,
                   help="keep the prepared corpus and both runs here (default: a temporary directory); finished runs "
                        "of the same config found there are scored again without training")
    p.add_argument("--out", default=str(RESULTS / "fim.json"))
    args = p.parse_args()
    torch.set_flush_denormal(True)
    data = Path(args.data)
    if not data.is_file():
        sys.exit(f"error: {data} not found")
    with tempfile.TemporaryDirectory(prefix="fim-bench-") as tmp:
        root = Path(args.runs or tmp)
        start = time.perf_counter()
        prepared = root / "data"
        if not (prepared / "manifest.json").is_file():
            prepare_corpus(data, prepared, 4096, args.val_fraction, args.tokenizer_chars)
        overrides = run_overrides(args.steps, args.seed, args.set)
        summaries = train_both(prepared, root, overrides, args.config)
        functions = held_out_functions(data, args.val_fraction, args.max_chars, args.functions, args.seed)
        scores = compare(root, functions, args.seed)
        minutes = (time.perf_counter() - start) / 60
    for name, (objective, _) in LAYOUTS.items():
        scores[name].update(val_loss=summaries[objective]["final_val_loss"],
                            val_bpb=summaries[objective]["final_val_bpb"],
                            train_minutes=round(summaries[objective]["elapsed_s"] / 60, 1))
    tasks = {"random_cuts": len(random_cuts(functions, args.seed)), "lines": len(line_cuts(functions))}
    result = {"command": " ".join(["python", "benchmarks/fim.py", *sys.argv[1:]]), "cpu": cpu_name(),
              "torch": torch.__version__, "steps": args.steps, "overrides": overrides, "functions": len(functions),
              "tasks": tasks, "minutes": round(minutes, 1), "scores": scores}
    clm, psm, spm = scores["clm"], scores["fim"], scores["fim_spm"]
    print(f"{len(functions)} held-out functions ({tasks['random_cuts']} random cuts, {tasks['lines']} lines), "
          f"{args.steps} steps each, {cpu_name()}, {minutes:.1f} min")
    print("| | CLM (prefix only) | FIM, PSM prompt | FIM, SPM prompt |")
    print("| --- | --- | --- | --- |")
    print(f"| loss on middles (nats/token) | {clm['middle_loss']:.3f} | {psm['middle_loss']:.3f} | "
          f"{spm['middle_loss']:.3f} |")
    print(f"| single-line infill exact match | {clm['line_exact_match']:.1%} | {psm['line_exact_match']:.1%} | "
          f"{spm['line_exact_match']:.1%} |")
    print(f"| left-to-right val loss | {clm['val_loss']:.3f} | {psm['val_loss']:.3f} "
          f"({psm['val_loss'] - clm['val_loss']:+.3f}) | (same run) |")
    print(f"| left-to-right val bits/byte | {clm['val_bpb']:.3f} | {psm['val_bpb']:.3f} | (same run) |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
