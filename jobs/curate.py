"""Curate pretraining data on Ray Data: read, clean, deduplicate, mix, tokenize, pack.

Examples:
  python jobs/curate.py --plan demo --output data/demo          # offline demo corpus
  python jobs/curate.py --plan production --print-plan          # the 8-source 100B plan
  python jobs/curate.py --input 'corpus/*.jsonl' --output out/  # your own files
  python jobs/curate.py --plan demo --write-plan my_plan.json   # edit, then --plan my_plan.json

Output (format mamba-slm-packed-v1): <output>/manifest.json, tokenizer.json, report.json,
train/shard-NNNNN.parquet and val/shard-NNNNN.parquet with rows of seq_len+1 tokens.
Joins the Ray cluster at RAY_ADDRESS when set (also under `ray job submit`), otherwise
starts a local one.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mamba_slm.platform.data.pipeline import run_curation
from mamba_slm.platform.data.plan import (
    CurationPlan, SourceSpec, TokenizerConfig, format_plan, get_plan)
from mamba_slm.platform.data.quality import QUALITY_PROFILES
from mamba_slm.platform.data.sources import MissingInputError, discover_files

EXTENSION_FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python jobs/curate.py", description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--plan", default=None, help="demo | production | a plan .json (default: demo, "
                   "or a one-source plan when --input is given)")
    p.add_argument("--input", action="append", default=[], metavar="GLOB",
                   help="local JSONL/Parquet/text files (repeatable); builds a one-source plan")
    p.add_argument("--text-field", default="text", help="JSON/Parquet field holding the text (default: text)")
    p.add_argument("--quality", default="web", choices=sorted(QUALITY_PROFILES),
                   help="filter profile for --input (default: web)")
    p.add_argument("--output", type=Path, help="output directory (created; its previous shards are replaced)")
    p.add_argument("--print-plan", action="store_true", help="print the plan and exit")
    p.add_argument("--write-plan", type=Path, metavar="FILE", help="write the plan as JSON and exit")
    p.add_argument("--seq-len", type=int, help="tokens per training row (rows hold seq_len+1)")
    p.add_argument("--target-tokens", type=int, help="total tokens to mix toward (0 = every document once)")
    p.add_argument("--tokenizer", help="tokenizer.json path or hub name instead of training a BPE")
    p.add_argument("--vocab-size", type=int, help="vocabulary of the trained BPE")
    p.add_argument("--max-files-per-source", type=int, help="read at most N files per source (quick runs)")
    p.add_argument("--keep-work", action="store_true", help="keep <output>/_work (intermediate files)")
    return p.parse_args(argv)


def build_plan(args: argparse.Namespace) -> CurationPlan:
    if args.input and args.plan:
        raise ValueError("give either --plan or --input, not both")
    if args.input:
        suffix = Path(args.input[0]).suffix
        plan = CurationPlan(name="custom", target_tokens=None, sources=(SourceSpec(
            name="input", format=EXTENSION_FORMATS.get(suffix, "text"), paths=tuple(args.input),
            weight=1.0, text_field=args.text_field, quality=args.quality),))
    else:
        plan = get_plan(args.plan or "demo")
    changes = {}
    if args.seq_len is not None:
        changes["seq_len"] = args.seq_len
    if args.target_tokens is not None:
        changes["target_tokens"] = args.target_tokens or None
    if args.tokenizer or args.vocab_size:
        tok = plan.tokenizer
        if args.tokenizer:
            tok = TokenizerConfig(kind="pretrained", name_or_path=args.tokenizer, vocab_size=tok.vocab_size,
                                  eos_token=tok.eos_token)
        if args.vocab_size:
            tok = TokenizerConfig(**{**tok.__dict__, "vocab_size": args.vocab_size})
        changes["tokenizer"] = tok
    if args.max_files_per_source:
        changes["sources"] = tuple(
            SourceSpec(**{**s.__dict__, "max_files": args.max_files_per_source}) for s in plan.sources)
    return plan.replace(**changes) if changes else plan


def fail(message: str) -> int:
    print(f"curate.py: error: {message}", file=sys.stderr)
    return 2


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        plan = build_plan(args)
    except KeyError as exc:  # a plan file without a required field
        return fail(f"the plan lacks the field {exc}; write one with --write-plan to see the format")
    except (ValueError, TypeError) as exc:
        return fail(f"{exc}\n  see: python jobs/curate.py --help")
    if args.print_plan or args.write_plan:
        if args.write_plan:
            try:
                args.write_plan.write_text(json.dumps(plan.to_dict(), indent=2) + "\n")
            except OSError as exc:
                return fail(f"--write-plan: {exc}")
            print(f"wrote {args.write_plan}")
        if args.print_plan:
            print(format_plan(plan))
        return 0
    if args.output is None:
        return fail("--output DIR is required to run a plan (or use --print-plan)")
    if "://" in str(args.output) or str(args.output).startswith(("s3:", "gs:")):  # Path folds "s3://" to "s3:/"
        return fail(f"--output {args.output}: give a directory (on a filesystem every node mounts, under "
                    "ray job submit); pretraining reads the shards from a directory too")
    if args.output.exists() and not args.output.is_dir():
        return fail(f"--output {args.output} is a file; give a directory")
    try:
        for spec in plan.sources:  # fail fast, before starting Ray
            if spec.format != "hf":
                discover_files(spec)
        run_curation(plan, args.output, keep_work=args.keep_work)
    except (MissingInputError, ValueError) as exc:  # missing input, unusable tokenizer, nothing left
        return fail(str(exc))
    except (NotADirectoryError, FileExistsError, PermissionError) as exc:  # --output is a file, read-only
        return fail(f"--output {args.output}: {exc}")
    print(f"done: {args.output}/manifest.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
