"""Quantize a model directory to weight-only INT8 or INT4 for CPU inference.

  python jobs/quantize.py --checkpoint runs/final --output runs/final-int8 --bits 8
  python jobs/quantize.py --checkpoint runs/final --output runs/final-int4 --bits 4 --group-size 32

The block linears (attention, MLP, Mamba-2 in/out projections) become INT8 (one scale per
output channel) or INT4 (scale + zero per --group-size input channels); embeddings, the
LM head, norms and the SSM parameters stay fp32. The output directory is loaded by
`mamba_slm.platform.post.loading.load_model_dir` (jobs/serve.py, bench/bench_quantize.py).
Measure the size, speed and perplexity change with bench/bench_quantize.py.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mamba_slm.model.io import TOKENIZER_FILE, WEIGHTS_FILE
from mamba_slm.platform.post.loading import load_model_dir
from mamba_slm.platform.post.quantize import QuantConfig, quantize_model, save_quantized, weights_nbytes


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python jobs/quantize.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, type=Path, help="float model directory (save_pretrained)")
    p.add_argument("--output", required=True, type=Path, help="directory to write the quantized model to")
    p.add_argument("--bits", type=int, default=8, choices=(8, 4), help="weight bits (default 8)")
    p.add_argument("--group-size", type=int, default=32, choices=(32, 64, 128, 256),
                   help="INT4: input channels per scale/zero (default 32; must divide the hidden sizes)")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.output.exists() and not args.output.is_dir():
        parser.error(f"--output {args.output} is a file, not a directory: pass a new directory")
    if args.output.exists() and any(args.output.iterdir()):
        parser.error(f"--output {args.output} exists and is not empty: pass a new directory")
    try:
        loaded = load_model_dir(args.checkpoint)
    except (FileNotFoundError, ValueError) as exc:
        parser.error(f"--checkpoint: {exc}")
    if loaded.quantized:
        parser.error(f"--checkpoint {args.checkpoint} is already quantized: pass the float model directory")
    before = weights_nbytes(loaded.model)
    cfg = QuantConfig(bits=args.bits, group_size=args.group_size)
    try:
        model = quantize_model(loaded.model, cfg)
    except ValueError as exc:
        parser.error(str(exc))
    save_quantized(model, args.output, cfg, tokenizer_file=args.checkpoint / TOKENIZER_FILE,
                   metadata={"eos_id": loaded.eos_id, "quantized_from": str(args.checkpoint.resolve())})
    after = weights_nbytes(model)
    size = (args.output / WEIGHTS_FILE).stat().st_size
    print(f"INT{args.bits} weights: {before / 2**20:.2f} MiB fp32 -> {after / 2**20:.2f} MiB in memory "
          f"({after / before:.2f}x), {size / 2**20:.2f} MiB on disk; wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
