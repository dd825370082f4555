"""`minipretrain` sub-commands. Each one parses its arguments and calls one function; user errors print one line
(`error: ...`) and exit with status 2."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

from minipretrain import __version__
from minipretrain.config import DTYPE_NAMES
from minipretrain.errors import PREEMPTED_EXIT_CODE, ConfigError, Preempted, UserError
from minipretrain.fileio import require_new_directory


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _output_dir(path: str, flag: str) -> Path:
    """A directory the command writes: refused before any work when the path is an existing file."""
    directory = Path(path)
    _require(not directory.exists() or directory.is_dir(), f"{flag} {path} is a file: give a directory")
    return directory


def cmd_train(args) -> None:
    from minipretrain.config import load_config
    from minipretrain.train.loop import train

    _output_dir(args.run_dir, "--run-dir")
    config_path = args.config
    if config_path is None and args.branch_from:  # the branched run's config, changed by --set
        from minipretrain.train.checkpoint import resolve_checkpoint

        config_path = resolve_checkpoint(args.branch_from) / "config.toml"
    if config_path is None and args.resume:
        config_path = Path(args.run_dir) / "config.toml"
        if not config_path.is_file():
            raise ConfigError(f"--resume: {config_path} not found; pass --config with the run's config")
    cfg = load_config(config_path, args.set)
    if args.branch_from and args.config is None and not any(s.startswith("train.checkpoint_mirror") for s in args.set):
        cfg.train.checkpoint_mirror = None  # the branched run's mirror is its own: a branch names one or has none
    train(cfg, args.run_dir, resume=args.resume, overwrite=args.overwrite, show_progress=not args.no_progress,
          branch_from=args.branch_from)


def cmd_tokenizer_train(args) -> None:
    from itertools import chain

    from minipretrain.data.sources import ReadStats, iter_documents
    from minipretrain.tokenizer import train_tokenizer

    _output_dir(args.out, "--out")
    stats = ReadStats()
    texts = chain.from_iterable(iter_documents(p, args.text_field, args.skip_bad_lines, stats) for p in args.data)
    tokenizer = train_tokenizer(texts, args.vocab_size, show_progress=not args.no_progress)
    if stats.documents == 0:
        raise UserError(f"no documents in {' '.join(args.data)} ({stats.summary()})")
    tokenizer.save(args.out)
    print(f"read {stats.summary()}")
    print(f"saved a {tokenizer.vocab_size}-token tokenizer (fingerprint {tokenizer.fingerprint}) to {args.out}")


def _inference_device(args):
    """The device and autocast context of `generate` and `eval`: --dtype resolved as training resolves
    train.dtype (bf16 autocast on GPUs and on CPUs with native bf16), TF32 for float32 matmuls on CUDA."""
    from minipretrain.parallel import resolve_device
    from minipretrain.precision import configure_device, mixed_precision, resolve_precision

    device = resolve_device(args.device, key="--device")
    precision = resolve_precision(args.dtype, device, key="--dtype")
    configure_device(device)
    autocast, _ = mixed_precision(device, precision.dtype)
    return device, autocast


def cmd_generate(args) -> None:
    import torch

    from minipretrain.generate import complete, infill
    from minipretrain.tokenizer import MASK
    from minipretrain.train.checkpoint import load_model_from_checkpoint

    _require(args.max_new_tokens >= 1, f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    _require(args.temperature >= 0, f"--temperature must be >= 0 (0 = greedy), got {args.temperature}")
    _require(args.top_k is None or args.top_k >= 1, f"--top-k must be at least 1, got {args.top_k}")
    _require(0 < args.top_p <= 1, f"--top-p must be in (0, 1] (1 = no cut), got {args.top_p}")
    _require(args.num_samples >= 1, f"--num-samples must be at least 1, got {args.num_samples}")
    fim = args.fim_prefix is not None or args.fim_suffix is not None
    _require(not (fim and args.prompt), "--prompt and --fim-prefix / --fim-suffix exclude each other "
                                        "(to fill in the middle, give the text before it as --fim-prefix)")
    device, autocast = _inference_device(args)
    model, tokenizer, cfg, ckpt = load_model_from_checkpoint(args.ckpt, str(device))
    if not model.causal:
        raise UserError(f"{ckpt} is a masked LM (train.objective=mlm): it does not generate text; fill masks with "
                        f"`minipretrain fill-mask --ckpt {args.ckpt} --text \"The {MASK} sat on the mat\"`")
    if fim:
        tokenizer.require_objective_tokens("--fim-prefix / --fim-suffix")
        if cfg.train.objective != "fim":
            raise UserError(f"{ckpt} was trained with train.objective={cfg.train.objective}, not fim: it never saw "
                            "the fill-in-the-middle layout (train with --set train.objective=fim)")
    generator = torch.Generator(device=device).manual_seed(args.seed)
    for i in range(args.num_samples):
        with autocast:
            if fim:  # prints the middle alone
                text = infill(model, tokenizer, args.fim_prefix or "", args.fim_suffix or "", args.max_new_tokens,
                              args.temperature, args.top_k, args.top_p, use_cache=not args.no_cache,
                              generator=generator, device=device)
            else:
                text = complete(model, tokenizer, args.prompt, args.max_new_tokens, args.temperature, args.top_k,
                                args.top_p, use_cache=not args.no_cache, generator=generator, device=device)
        if args.num_samples > 1:
            print(f"--- sample {i + 1}")
        print(text)


def cmd_fill_mask(args) -> None:
    from minipretrain.generate import fill_mask
    from minipretrain.tokenizer import MASK
    from minipretrain.train.checkpoint import load_model_from_checkpoint

    _require(args.top_k >= 1, f"--top-k must be at least 1, got {args.top_k}")
    _require(MASK in args.text, f"--text has no {MASK}: mark each token to predict, e.g. \"The {MASK} sat on the mat\"")
    device, autocast = _inference_device(args)
    model, tokenizer, cfg, ckpt = load_model_from_checkpoint(args.ckpt, str(device))
    if model.causal:
        raise UserError(f"{ckpt} is a causal LM: fill-mask needs a masked LM (trained with --set train.objective=mlm); "
                        "`minipretrain generate` samples from this one")
    start_id = tokenizer.bos_id if cfg.data.layout == "padded" else tokenizer.eos_id  # as its training rows began
    with autocast:
        filled, predictions = fill_mask(model, tokenizer, args.text, args.top_k, start_id, device)
    if args.json:
        print(json.dumps({"text": filled, "masks": [[{"token": token, "probability": p} for token, p in candidates]
                                                    for candidates in predictions]}, ensure_ascii=False))
        return
    print(filled)
    for i, candidates in enumerate(predictions, 1):
        print(f"{MASK} {i}: " + "   ".join(f"{token!r} {p:.3f}" for token, p in candidates))


def cmd_data_prepare(args) -> None:
    from minipretrain.data.shards import PrepareOptions, default_workers, prepare
    from minipretrain.tokenizer import Tokenizer

    _output_dir(args.out, "--out")
    tokenizer = Tokenizer.load(args.tokenizer)
    options = PrepareOptions(args.text_field, args.skip_bad_lines, args.val_fraction, args.shard_tokens,
                             default_workers() if args.workers is None else args.workers)
    prepare(args.data, tokenizer, args.out, options, show_progress=not args.no_progress, overwrite=args.overwrite)


def cmd_data_info(args) -> None:
    from minipretrain.data.shards import PreparedData, describe

    data = PreparedData(args.dir, verify=not args.no_verify, show_progress=True)
    m = data.manifest
    print(f"{args.dir}: {describe(m)}")
    print(f"  tokenizer {m['tokenizer_fingerprint']}, vocab {m['vocab_size']}, {m['dtype']}; shards "
          f"{'verified (sizes, headers, sha256)' if not args.no_verify else 'checked (sizes, headers)'}")
    for info in m["splits"].values():
        for shard in info["shards"]:
            print(f"  {shard['file']}: {shard['tokens']:,} tokens, {shard['documents']:,} documents")


def cmd_eval(args) -> None:
    import tempfile

    from minipretrain.data.batches import ObjectiveRows, make_rows
    from minipretrain.data.objectives import EVAL_SEED, fim_middles, make_objective, validation_objective
    from minipretrain.data.shards import PreparedData, PrepareOptions, is_prepared, prepare
    from minipretrain.evaluate import evaluate, token_byte_lengths
    from minipretrain.train.checkpoint import load_model_from_checkpoint

    _require(args.batch_size >= 1, f"--batch-size must be at least 1, got {args.batch_size}")
    _require(args.seq_len is None or args.seq_len >= 2, f"--seq-len must be at least 2, got {args.seq_len}")
    device, autocast = _inference_device(args)
    model, tokenizer, cfg, ckpt = load_model_from_checkpoint(args.ckpt, str(device))
    if args.fim:
        if not model.causal:
            raise UserError(f"--fim scores filling in the middle, which {ckpt}, a masked LM, does not do")
        tokenizer.require_objective_tokens("--fim")
    # As validation scores it: the loss on middles with --fim, else masked tokens for a masked LM, all tokens else.
    objective = fim_middles(tokenizer) if args.fim else validation_objective(make_objective(cfg.train, tokenizer))
    seq_len = args.seq_len or cfg.train.seq_len
    if seq_len > cfg.model.max_position_embeddings:
        raise ConfigError(f"--seq-len {seq_len} exceeds the model's "
                          f"max_position_embeddings={cfg.model.max_position_embeddings}")
    with tempfile.TemporaryDirectory(prefix="minipretrain-eval-") as tmp:
        directory = args.data
        if not is_prepared(args.data):  # raw text: tokenize it into a scratch directory first
            directory = Path(tmp) / "data"
            prepare([args.data], tokenizer, directory, PrepareOptions(args.text_field, args.skip_bad_lines, workers=1),
                    show_progress=not args.json, log=lambda message: None)
        data = PreparedData(directory, tokenizer.fingerprint)
        split = args.split or ("val" if data.split("val") is not None else "train")
        stream = data.split(split)
        if stream is None:
            raise UserError(f"{args.data} has no documents in its {split} split")
        rows = ObjectiveRows(make_rows(stream, "packed", seq_len, tokenizer, cfg.data.document_mask, for_eval=True),
                             objective, EVAL_SEED)
        token_bytes = token_byte_lengths(tokenizer, cfg.model.vocab_size)
        result = evaluate(model, rows, args.batch_size, token_bytes, device=str(device), autocast=autocast,
                          show_progress=not args.json)
    scored = "middles" if args.fim else "masked tokens" if not model.causal else "all tokens"
    result.update(checkpoint=str(ckpt), data=args.data, split=split, documents=stream.num_documents, seq_len=seq_len,
                  scored=scored)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{ckpt} on {args.data} ({split}: {stream.num_documents:,} documents, {result['tokens']:,} predicted "
              f"tokens ({scored}), seq {seq_len}):")
        last = (f"bits/byte {result['bits_per_byte']:.4f}" if model.causal
                else f"accuracy {result['accuracy']:.4f}")  # bits per byte: a rate only left-to-right loss is
        print(f"  {'loss on middles' if args.fim else 'loss'} {result['loss']:.4f}   perplexity "
              f"{result['perplexity']:.2f}   {last}")


def cmd_plot(args) -> None:
    from minipretrain.plots import plot_runs

    out = plot_runs(args.runs, args.out, args.x)
    print(f"wrote {out}")


def cmd_checkpoint_consolidate(args) -> None:
    from minipretrain.train.checkpoint import consolidate

    if args.out is not None:
        _output_dir(args.out, "--out")
    target = consolidate(args.ckpt, args.out)
    print(f"wrote {target / 'model.safetensors'} (checksums in {target / 'meta.json'})")


def cmd_export_hf(args) -> None:
    from minipretrain.interop.hf import export_hf, transformers_auto_model, verify_export

    require_new_directory(args.out)
    if args.verify:
        transformers_auto_model("--verify")  # refused before anything is written
    out, model_type = export_hf(args.ckpt, args.out, args.dtype)
    print(f"wrote {out} ({model_type}, {args.dtype}): load it with "
          f"transformers.AutoModelForCausalLM.from_pretrained({str(out)!r})")
    if args.verify:
        # Both sides compute in float32 from the same stored (possibly rounded) weights, whatever --dtype.
        difference = verify_export(args.ckpt, out)
        if not math.isfinite(difference) or difference > 1e-4:
            raise UserError(f"{out}: transformers' logits differ from minipretrain's by {difference:.2e} "
                            "(more than 1e-4): please report this as a bug")
        print(f"verified: transformers' logits equal minipretrain's (max abs difference {difference:.2e})")


def cmd_export_minimind(args) -> None:
    from minipretrain.interop.minimind import export_minimind

    out = Path(args.out)
    _require(not out.exists(), f"--out {out} already exists: choose a new file (e.g. out/pretrain_768.pth)")
    _require(out.suffix == ".pth", f"--out {out}: MiniMind's trainer loads .pth files (e.g. out/pretrain_768.pth)")
    out, flags = export_minimind(args.ckpt, out)
    print(f"wrote {out} (fp16 state dict): MiniMind's trainer builds the model with {flags}; put it in its out/ "
          f"directory as pretrain_<hidden_size>{'_moe' if '--use_moe' in flags else ''}.pth for eval_llm.py "
          "--weight pretrain or train_full_sft.py --from_weight pretrain")


def cmd_import_hf(args) -> None:
    from minipretrain.interop.hf import import_hf

    require_new_directory(args.out)
    out, model_cfg = import_hf(args.model, args.out)
    print(f"wrote checkpoint {out} ({model_cfg.num_hidden_layers} layers, hidden {model_cfg.hidden_size}); "
          f"try `minipretrain generate --ckpt {out}`")


def cmd_import_minimind(args) -> None:
    from minipretrain.interop.minimind import import_minimind

    require_new_directory(args.out)
    out = import_minimind(args.pth, args.tokenizer, args.out, args.config, args.set)
    print(f"wrote checkpoint {out}; try `minipretrain generate --ckpt {out}`")


def cmd_plan(args) -> None:
    from minipretrain.config import load_config
    from minipretrain.plan import PlanOptions, format_plan, make_plan, measure_in_subprocess

    options = PlanOptions(args.devices, args.budget_flops, args.gpu_hours, args.gpu, args.peak_tflops, args.mfu,
                          args.data, args.sample_mb, args.tokens_per_s, args.gpu_memory_gib, args.pipeline_stages,
                          args.microbatches, args.measure, args.measure_steps)
    options.validate()  # every flag before any work
    cfg = load_config(args.config, args.set)
    measured = measure_in_subprocess(cfg, args.measure_steps) if args.measure else None
    plan = make_plan(cfg, options, measured)
    print(json.dumps(plan) if args.json else format_plan(plan))


DTYPE_HELP = ("autocast dtype, resolved like train.dtype (auto: bf16 on GPUs and on CPUs with native bf16, else "
              "float32; float16 on CUDA only)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="minipretrain", description="Pretrain MiniMind language models.")
    parser.add_argument("--version", action="version", version=f"minipretrain {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="pretrain a model (or --resume one)")
    p.add_argument("--config", help="TOML preset, e.g. configs/tiny.toml (default: the run's own config on --resume)")
    p.add_argument("--run-dir", default="runs/default", help="where checkpoints, metrics and samples go")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config value, e.g. --set optim.lr=3e-4 (repeatable)")
    p.add_argument("--resume", nargs="?", const=True, default=False, metavar="CKPT",
                   help="continue from the run's latest checkpoint (or from the checkpoint directory given)")
    p.add_argument("--branch-from", metavar="CKPT",
                   help="start a new run in --run-dir from another run's checkpoint: weights, optimizer, step and "
                        "data position, with this run's schedule and data (e.g. a WSD decay phase)")
    p.add_argument("--overwrite", action="store_true", help="delete an existing run in --run-dir and start over")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs still print)")
    p.set_defaults(func=cmd_train)

    tok = sub.add_parser("tokenizer", help="tokenizer tools").add_subparsers(dest="tokenizer_command", required=True)
    p = tok.add_parser("train", help="train a byte-level BPE tokenizer")
    p.add_argument("--data", nargs="+", required=True, help="files, directories, globs or builtin:python-docs")
    p.add_argument("--vocab-size", type=int, default=6400)
    p.add_argument("--out", required=True, help="directory for tokenizer.json and tokenizer_config.json")
    p.add_argument("--text-field", default="text", help="JSONL field holding the text")
    p.add_argument("--skip-bad-lines", action="store_true", help="skip and count malformed lines")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_tokenizer_train)

    data = sub.add_parser("data", help="data tools").add_subparsers(dest="data_command", required=True)
    p = data.add_parser("prepare", help="tokenize text into binary token shards (then train with data.path=OUT)")
    p.add_argument("--data", nargs="+", required=True,
                   help="JSONL, text or Parquet files, directories, globs or builtin:python-docs")
    p.add_argument("--tokenizer", required=True, help="directory with tokenizer.json (the run's tokenizer)")
    p.add_argument("--out", required=True, help="directory for the shards and manifest.json")
    p.add_argument("--workers", type=int, default=None, help="tokenizer processes (default: one per CPU core)")
    p.add_argument("--val-fraction", type=float, default=0.01,
                   help="share of documents held out as the val split (default 0.01; 0 for none)")
    p.add_argument("--shard-tokens", type=int, default=100_000_000, help="start a new shard after this many tokens")
    p.add_argument("--text-field", default="text", help="JSONL field / Parquet column holding the text")
    p.add_argument("--skip-bad-lines", action="store_true", help="skip and count malformed lines")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it holds other prepared data")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_data_prepare)
    p = data.add_parser("info", help="summary of a prepared directory; verifies every shard's checksum")
    p.add_argument("dir")
    p.add_argument("--no-verify", action="store_true", help="check sizes and headers only, skip the sha256")
    p.set_defaults(func=cmd_data_info)

    ckpt = sub.add_parser("checkpoint", help="checkpoint tools").add_subparsers(dest="checkpoint_command",
                                                                                required=True)
    p = ckpt.add_parser("consolidate", help="gather a distributed checkpoint's shards into one model.safetensors")
    p.add_argument("ckpt", help="a run directory (its latest checkpoint) or a checkpoint directory")
    p.add_argument("--out", default=None,
                   help="a new directory for model.safetensors, config and tokenizer (default: inside the checkpoint)")
    p.set_defaults(func=cmd_checkpoint_consolidate)

    p = sub.add_parser("plot", help="plot loss, validation, lr, gradient norm and tokens/s of runs into a PNG")
    p.add_argument("runs", nargs="+", metavar="RUN", help="run directories (several are overlaid)")
    p.add_argument("--out", default=None, help="PNG to write (default: RUN/plots.png for one run, ./plots.png "
                                               "for several)")
    p.add_argument("--x", choices=("step", "tokens"), default="step", help="x axis (default: step)")
    p.set_defaults(func=cmd_plot)

    export = sub.add_parser("export", help="write a checkpoint in another framework's format").add_subparsers(
        dest="export_command", required=True)
    p = export.add_parser("hf", help="a Hugging Face transformers directory (Llama / Qwen3 / Qwen3-MoE / Mixtral)")
    p.add_argument("--ckpt", required=True, help="a run directory (its latest checkpoint) or a checkpoint directory")
    p.add_argument("--out", required=True, help="a new directory for the weights, config and tokenizer")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="dtype of the stored weights (default float32: exact)")
    p.add_argument("--verify", action="store_true",
                   help="load the export in transformers and check its logits equal ours (needs minipretrain[hf])")
    p.set_defaults(func=cmd_export_hf)
    p = export.add_parser("minimind", help="a .pth for MiniMind's own eval_llm.py and SFT trainer (MiniMind-3 layout)")
    p.add_argument("--ckpt", required=True, help="a run directory (its latest checkpoint) or a checkpoint directory")
    p.add_argument("--out", required=True, help="a new .pth file, e.g. ../minimind/out/pretrain_768.pth")
    p.set_defaults(func=cmd_export_minimind)
    imp = sub.add_parser("import", help="make a checkpoint from another framework's weights").add_subparsers(
        dest="import_command", required=True)
    p = imp.add_parser("hf", help="a transformers Llama / Qwen3 / Qwen3-MoE / Mixtral directory (safetensors)")
    p.add_argument("--model", required=True, help="the transformers model directory")
    p.add_argument("--out", required=True, help="a new checkpoint directory")
    p.set_defaults(func=cmd_import_hf)
    p = imp.add_parser("minimind", help="a .pth written by MiniMind's trainer (MiniMind-3 or MiniMind2 layout)")
    p.add_argument("--pth", required=True, help="e.g. out/pretrain_768.pth")
    p.add_argument("--tokenizer", required=True, help="MiniMind's tokenizer directory (its model/ folder)")
    p.add_argument("--out", required=True, help="a new checkpoint directory")
    p.add_argument("--config", default=None,
                   help="a preset giving the model shape (default: read from the tensors, MiniMind's defaults)")
    p.add_argument("--set", action="append", default=[], metavar="model.KEY=VALUE",
                   help="override a model key the tensors cannot tell, e.g. model.num_experts_per_tok=2")
    p.set_defaults(func=cmd_import_minimind)

    p = sub.add_parser("generate", help="sample text from a checkpoint")
    p.add_argument("--ckpt", required=True, help="a run directory (its latest checkpoint) or a checkpoint directory")
    p.add_argument("--prompt", default="")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps")
    p.add_argument("--dtype", default="auto", choices=DTYPE_NAMES, help=DTYPE_HELP)
    p.add_argument("--no-cache", action="store_true", help="recompute the whole prefix each token (for checking)")
    p.add_argument("--fim-prefix", default=None, help="fill in the middle (a model trained with train.objective=fim): "
                                                      "the text before the gap; prints the middle")
    p.add_argument("--fim-suffix", default=None, help="fill in the middle: the text after the gap")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("fill-mask", help="predict the <|mask|> tokens of a text (a masked LM: train.objective=mlm)")
    p.add_argument("--ckpt", required=True, help="a run directory (its latest checkpoint) or a checkpoint directory")
    p.add_argument("--text", required=True, help='e.g. "The <|mask|> sat on the mat"')
    p.add_argument("--top-k", type=int, default=5, help="candidates shown per mask")
    p.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps")
    p.add_argument("--dtype", default="auto", choices=DTYPE_NAMES, help=DTYPE_HELP)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_fill_mask)

    p = sub.add_parser("eval", help="loss, perplexity and bits per byte of a checkpoint on some text")
    p.add_argument("--ckpt", required=True)
    p.add_argument("--data", required=True, help="a text file, directory or glob, or a prepared directory")
    p.add_argument("--split", choices=("train", "val"), default=None,
                   help="split of a prepared directory (default: val when it has one)")
    p.add_argument("--seq-len", type=int, default=None, help="default: the training seq_len")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--text-field", default="text")
    p.add_argument("--skip-bad-lines", action="store_true")
    p.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps")
    p.add_argument("--dtype", default="auto", choices=DTYPE_NAMES, help=DTYPE_HELP)
    p.add_argument("--fim", action="store_true",
                   help="score filling in the middle: every document in PSM, loss on its middle only")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("plan", help="parameters, FLOPs, compute-optimal tokens, memory per GPU and time of a config "
                                    "(docs/planning.md)")
    p.add_argument("--config", default="configs/tiny.toml", help="TOML preset (default configs/tiny.toml)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config value, e.g. --set train.batch_size=8 (repeatable)")
    p.add_argument("--devices", type=int, default=1, help="data-parallel GPUs (default 1)")
    p.add_argument("--budget-flops", type=float, default=None, help="compute budget in FLOPs, e.g. 1e19")
    p.add_argument("--gpu-hours", type=float, default=None, help="compute budget in GPU-hours (needs --gpu or "
                                                                  "--peak-tflops)")
    p.add_argument("--gpu", default=None, help="GPU name for its dense bf16 peak, e.g. H100, A100")
    p.add_argument("--peak-tflops", type=float, default=None, help="the GPU's dense peak TFLOP/s (overrides --gpu)")
    p.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilization in (0, 1] (default 0.4)")
    p.add_argument("--data", default=None, help="a corpus to count tokens in (file, directory, glob, prepared)")
    p.add_argument("--sample-mb", type=float, default=2.0, help="MB of --data to tokenize (default 2)")
    p.add_argument("--tokens-per-s", type=float, default=None, help="global training throughput, for the time")
    p.add_argument("--gpu-memory-gib", type=float, default=None, help="GPU memory: the largest batch that fits")
    p.add_argument("--pipeline-stages", type=int, default=None, help="pipeline stages p, for the bubble")
    p.add_argument("--microbatches", type=int, default=None, help="micro-batches m per step, for the bubble")
    p.add_argument("--measure", action="store_true", help="run a few real training steps here (train.device) to "
                                                          "measure tokens/s and peak memory")
    p.add_argument("--measure-steps", type=int, default=3, help="timed steps with --measure (default 3)")
    p.add_argument("--json", action="store_true", help="print one JSON object with every number")
    p.set_defaults(func=cmd_plan)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    # Under torchrun every rank reports its own failure, so the one that failed first is named.
    rank = f"[rank {os.environ['RANK']}] " if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
    try:
        args.func(args)
    except UserError as e:
        print(f"{rank}error: {e}", file=sys.stderr)
        sys.exit(2)
    except Preempted as e:  # a checkpoint was saved: the scheduler should run the job again with --resume
        print(f"{rank}{e}", file=sys.stderr)
        sys.exit(PREEMPTED_EXIT_CODE)
    except KeyboardInterrupt:
        print(f"{rank}interrupted; a run continues from its last checkpoint with --resume", file=sys.stderr)
        sys.exit(130)
