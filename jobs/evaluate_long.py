"""Perplexity of a model on long documents, beyond the context it was trained at.

  python jobs/evaluate_long.py --checkpoint runs/final --text book.txt --context 32768 \
      --rope-scaling none yarn ntk

Loads the model directory once per RoPE scaling (factor = --context / trained context;
Mamba-2 layers need no change), cuts each document into windows of --context tokens and
prints the loss/perplexity overall and per position bucket (one bucket per trained
length), next to the reference: the unscaled model reading the same tokens in pieces of
the trained context. With --context at or below the trained context no scaling applies
and the reference is the only run. --output writes the JSON.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mamba_slm.model.io import load_config
from mamba_slm.platform.evaluate.checkpoint import resolve_device
from mamba_slm.platform.post.long_context import SCALING_TYPES, evaluate_long_context
from mamba_slm.platform.post.loading import check_model_dir


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python jobs/evaluate_long.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, type=Path, help="model directory (save_pretrained)")
    p.add_argument("--text", required=True, type=Path, nargs="+",
                   help="UTF-8 text files, one document each (plays, books, long source files)")
    p.add_argument("--context", type=int, help="evaluation context in tokens (default: 4x the trained one)")
    p.add_argument("--rope-scaling", nargs="+", default=["none", "yarn"], choices=SCALING_TYPES,
                   help="RoPE scalings to compare (default: none yarn)")
    p.add_argument("--max-windows", type=int, help="evaluate at most this many windows (for a quick look)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available, else cpu)")
    p.add_argument("--output", type=Path, help="write the results as JSON here")
    return p


def format_results(results: dict) -> str:
    lines = [f"trained context {results['trained_context']}, evaluated at {results['context']}"]
    for run in results["runs"]:
        scaling = run["rope_scaling"]
        label = scaling if isinstance(scaling, str) else f"{scaling['type']} x{scaling['factor']:g}"
        buckets = "  ".join(f"[{b['start']},{b['end']}) {b['ppl']:.2f}" for b in run["by_position"])
        lines.append(f"ctx {run['context']:>6}  rope {label:<10} ppl {run['ppl']:9.3f}  "
                     f"({run['tokens']} tokens)  by position: {buckets}")
    if results["context"] <= results["trained_context"]:
        lines.append("(no RoPE scaling applies at or below the trained context: the reference is the only run)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        device = resolve_device(args.device)
    except ValueError as exc:
        parser.error(f"--device: {exc}")
    try:
        trained = load_config(check_model_dir(args.checkpoint)).max_seq_len
    except (FileNotFoundError, ValueError) as exc:
        parser.error(f"--checkpoint: {exc}")
    missing = [str(t) for t in args.text if not t.is_file()]
    if missing:
        parser.error(f"--text: no such file(s): {', '.join(missing)}")
    context = args.context or 4 * trained
    if context < 1 or (args.max_windows is not None and args.max_windows < 1):
        parser.error("--context and --max-windows must be positive")
    texts = [t.read_text(encoding="utf-8", errors="replace") for t in args.text]
    try:
        results = evaluate_long_context(args.checkpoint, texts, context, args.rope_scaling, args.max_windows,
                                        device=device)
    except ValueError as exc:
        parser.error(str(exc))
    print(format_results(results))
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
