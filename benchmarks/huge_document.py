"""Peak memory of `minipretrain tokenizer train` and `minipretrain data prepare` on one huge document.

    python benchmarks/huge_document.py                         # this checkout
    python benchmarks/huge_document.py --src /tmp/before/src   # another checkout's code (e.g. `git archive HEAD`)

Builds, in a temporary directory, a JSONL file holding ONE document of --mb MB (tinyshakespeare.txt and
zh-novel-xiyouji.txt from ../shared/data, repeated: English, Chinese, CRLF line ends, full-width spaces) and the
same text as many documents of ~20 lines each. Each command runs in a fresh process; its peak RSS is ru_maxrss from
os.wait4 (the process and the workers it waited for; this script imports neither torch nor tokenizers, so the few
MB a fork copies from it do not matter). Prints a table and the fingerprints of the tokenizer and of the shards, so
two checkouts can be shown to write the same tokens.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
RESULTS = ROOT / "benchmarks" / "results"


def write_corpora(directory: Path, mb: float) -> tuple[Path, Path, int]:
    """The one-document file, the same text as documents of 20 lines each, and their number."""
    parts = [(SHARED / name).read_bytes().decode("utf-8") for name in ("tinyshakespeare.txt", "zh-novel-xiyouji.txt")]
    unit = "\n\n".join(parts) + "\n\n"
    text = unit * max(1, round(mb * 1e6 / len(unit.encode("utf-8"))))
    one = directory / "one_document.jsonl"
    one.write_text(json.dumps({"text": text}, ensure_ascii=False) + "\n", encoding="utf-8")
    lines = text.split("\n")
    many = directory / "many_documents.jsonl"
    with open(many, "w", encoding="utf-8") as f:
        for i in range(0, len(lines), 20):
            f.write(json.dumps({"text": "\n".join(lines[i : i + 20])}, ensure_ascii=False) + "\n")
    return one, many, len(range(0, len(lines), 20))


def run(argv: list[str], src: str | None) -> dict:
    """`python -m minipretrain ARGV` in a fresh process: its peak RSS and wall time."""
    env = dict(os.environ, TOKENIZERS_PARALLELISM="true")
    if src:
        env["PYTHONPATH"] = src
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "minipretrain", *argv, "--no-progress"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    output = proc.stdout.read().decode()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        sys.exit(f"error: minipretrain {' '.join(argv)} failed:\n{output}")
    return {"peak_mib": usage.ru_maxrss / 1024, "seconds": time.perf_counter() - start}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mb", type=float, default=40, help="size of the one document in MB of UTF-8")
    p.add_argument("--src", help="PYTHONPATH for the measured commands (default: this checkout)")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--label", default="after", help="name of the result file")
    args = p.parse_args(argv)
    RESULTS.mkdir(parents=True, exist_ok=True)
    result = {"src": args.src or str(ROOT / "src"), "mb": args.mb, "runs": []}
    with tempfile.TemporaryDirectory(prefix="minipretrain-huge-") as tmp:
        scratch = Path(tmp)
        one, many, documents = write_corpora(scratch, args.mb)
        print(f"one document: {one.stat().st_size / 1e6:.1f} MB; the same text as {documents:,} documents")
        # the tokenizer the preparations use: trained on the many small documents (fast, the same in every checkout)
        run(["tokenizer", "train", "--data", str(many), "--vocab-size", "6400", "--out", str(scratch / "tok")],
            args.src)
        jobs = [(f"tokenizer train ({name})", ["tokenizer", "train", "--data", str(path), "--vocab-size", "6400",
                                               "--out", str(scratch / f"tok-{name}")])
                for name, path in (("one document", one), ("many documents", many))]
        jobs += [(f"data prepare --workers {w} ({name})",
                  ["data", "prepare", "--data", str(path), "--tokenizer", str(scratch / "tok"), "--out",
                   str(scratch / f"prep-{name.split()[0]}-{w}"), "--workers", str(w), "--val-fraction", "0"])
                 for w in args.workers for name, path in (("one document", one), ("many documents", many))]
        print("| command | peak RSS MiB | seconds |")
        print("| --- | --- | --- |")
        for label, job in jobs:
            r = run(job, args.src)
            out = Path(job[job.index("--out") + 1])
            if job[0] == "tokenizer":
                tok = json.loads((out / "tokenizer.json").read_text(encoding="utf-8"))
                model = json.dumps(tok["model"], sort_keys=True).encode()  # the vocabulary and merges
                r["fingerprint"] = hashlib.sha256(model).hexdigest()[:16]
            else:
                manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
                r["fingerprint"] = " ".join(s["sha256"][:12] for s in manifest["splits"]["train"]["shards"])
                r["tokens"] = manifest["summary"]["tokens"]
            result["runs"].append({"command": label, **r})
            print(f"| {label} | {r['peak_mib']:,.0f} | {r['seconds']:.1f} |", flush=True)
    for r in result["runs"]:
        print(f"{r['command']}: {r['fingerprint']}" + (f" ({r['tokens']:,} tokens)" if "tokens" in r else ""))
    out = RESULTS / f"huge-document-{args.label}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
