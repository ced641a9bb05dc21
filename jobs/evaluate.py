"""Evaluate a checkpoint: lm-eval benchmarks beside the seed's GPT-3 column, and/or
held-out perplexity on curated data.

  python jobs/evaluate.py --checkpoint runs/x/final --benchmarks all --output results.json
  python jobs/evaluate.py --checkpoint runs/x/final --benchmarks local          # offline smoke tasks
  python jobs/evaluate.py --checkpoint runs/x/final --perplexity data/demo      # val split

--checkpoint is a model directory of this project (config.json + model.safetensors +
tokenizer.json, as training's final model), or a training checkpoint directory.
--benchmarks: 'all' = MMLU, HellaSwag, ARC-Easy, ARC-Challenge, TruthfulQA (MC2),
HumanEval, PIQA, WinoGrande, LAMBADA, BoolQ (lm-eval task names also accepted, comma
separated); 'local' = the project's own tasks (multiple choice, perplexity, generation),
which need no network. The standard tasks download data from the Hugging Face hub: with
no hub access the job stops (exit code 2) naming the tasks that need a download.
HumanEval runs model-written code; it runs only with --allow-code-execution (with 'all'
and without the flag it is skipped and marked so in the table).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python jobs/evaluate.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, type=Path, help="model or training checkpoint directory")
    p.add_argument("--benchmarks", help="'all', 'local', or a comma list of tasks (see above)")
    p.add_argument("--perplexity", type=Path, metavar="DATA_DIR", help="curated data dir (jobs/curate.py output)")
    p.add_argument("--split", default="val", help="split for --perplexity (default %(default)s)")
    p.add_argument("--max-batches", type=int, help="cap on --perplexity batches (default: the whole split)")
    p.add_argument("--output", type=Path, help="write lm-eval's results (+ table, perplexity) as JSON here")
    p.add_argument("--tokenizer", type=Path, help="tokenizer.json (default: the one in --checkpoint)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available, else cpu)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="autocast dtype for the forward passes (GPU); weights stay fp32")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass (default %(default)s)")
    p.add_argument("--num-fewshot", type=int, help="few-shot examples (default: each task's own)")
    p.add_argument("--limit", type=float, help="examples per task (int) or fraction (<1), for quick checks")
    p.add_argument("--bootstrap-iters", type=int, default=1000, help="stderr bootstrap (0: off; lm-eval: 100000)")
    p.add_argument("--allow-code-execution", action="store_true",
                   help="let HumanEval run the code the model writes (do this in a sandbox)")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.benchmarks and not args.perplexity:
        parser.error("nothing to do: give --benchmarks (all, local or task names) and/or --perplexity DATA_DIR")
    for flag in ("batch_size", "max_batches", "bootstrap_iters", "num_fewshot"):
        value = getattr(args, flag)
        if value is not None and value < (0 if flag in ("bootstrap_iters", "num_fewshot") else 1):
            parser.error(f"--{flag.replace('_', '-')} {value} is out of range")
    if not args.checkpoint.is_dir():
        parser.error(f"--checkpoint {args.checkpoint} is not a directory")
    if args.perplexity and not (args.perplexity / "manifest.json").is_file():
        parser.error(f"--perplexity {args.perplexity} has no manifest.json: give a jobs/curate.py output dir")

    from mamba_slm.platform.evaluate import benchmarks as bm
    from mamba_slm.platform.evaluate.checkpoint import CheckpointError, load_checkpoint, resolve_device

    try:
        device = resolve_device(args.device)
    except ValueError as exc:
        parser.error(f"--device: {exc}")

    chosen, skipped = [], {}
    if args.benchmarks:
        try:
            chosen = bm.select(args.benchmarks)
        except ValueError as exc:
            parser.error(str(exc))
        unsafe = [b for b in chosen if b.unsafe]
        if unsafe and not args.allow_code_execution:
            if "all" not in args.benchmarks.lower().split(","):
                parser.error(f"{unsafe[0].task} executes model-written code: add --allow-code-execution")
            skipped = {b.task: "skipped: needs --allow-code-execution" for b in unsafe}
            print(f"note: skipping {', '.join(skipped)} (runs model-written code; "
                  f"add --allow-code-execution to include it)", file=sys.stderr)
    to_run = [b for b in chosen if b.task not in skipped]
    if to_run:
        from mamba_slm.platform.extras import missing_extra

        if msg := missing_extra("eval", what="--benchmarks (lm-eval runs them)"):
            parser.error(msg)

    loaded = None

    def load():
        nonlocal loaded
        if loaded is None:
            loaded = load_checkpoint(args.checkpoint, device=device, tokenizer_file=args.tokenizer)
        return loaded

    report: dict = {"checkpoint": str(args.checkpoint)}
    results = None
    try:
        if args.perplexity:  # before the benchmarks: their results must not be lost to a data mismatch
            from mamba_slm.platform.evaluate.perplexity import check_vocabulary, perplexity
            check_vocabulary(args.perplexity, load().model.config.vocab_size, load().tokenizer,
                             model_name=str(args.checkpoint))
        if to_run:
            from mamba_slm.platform.evaluate.lm import MambaSlmLM
            results = bm.run(lambda: MambaSlmLM(loaded=load(), batch_size=args.batch_size, dtype=args.dtype),
                             to_run, num_fewshot=args.num_fewshot, limit=args.limit,
                             allow_code_execution=args.allow_code_execution, bootstrap_iters=args.bootstrap_iters)
        if args.perplexity:
            report["perplexity"] = {"data": str(args.perplexity), "split": args.split,
                                    **perplexity(load().model, args.perplexity, split=args.split,
                                                 max_batches=args.max_batches, batch_size=args.batch_size)}
    except bm.NeedsDownload as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (CheckpointError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    if chosen:
        table = bm.format_table(results, chosen, skipped)
        print(table)
        report["table"] = [{"benchmark": b.name, "task": b.task, "metric": b.metric, "score": bm.score(results or {}, b),
                            "gpt3_reference": b.reference, "skipped": skipped.get(b.task)} for b in chosen]
    if "perplexity" in report:
        p = report["perplexity"]
        print(f"perplexity on {args.perplexity} [{args.split}]: loss {p['loss']:.4f}  ppl {p['ppl']:.3f}  "
              f"({p['tokens']} tokens, {p['rows']} rows)")
    if args.output:
        default = str  # lm-eval's results hold numpy values and callables; a perplexity report does not
        if results:
            from lm_eval.utils import handle_non_serializable as default
        out = {**(dict(results) if results else {}), "mamba_slm": report}
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(out, indent=2, default=default))
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
