"""Export a model directory to ONNX (full-sequence forward, no decoding state) and check
it against PyTorch with onnxruntime on the CPU.

  python jobs/export_onnx.py --checkpoint runs/final --output runs/final-onnx/model.onnx

The graph maps input_ids (batch, seq) int64 to logits (batch, seq, vocab) float32; batch is
1 (or dynamic with --dynamic-batch, a ~3x slower export), seq is dynamic in multiples of the model's Mamba-2 chunk size (pad on the right;
`mamba_slm.platform.post.onnx_export.OnnxLM` does it for you). Decoding with the Mamba-2 /
KV state is not exported: see the module docstring of mamba_slm.platform.post.onnx_export.
The tokenizer.json is copied beside the .onnx file. Nothing is overwritten: an existing
--output (or its .data file of external weights), or a different tokenizer.json in its
folder, is refused before the export starts.
"""
from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
from pathlib import Path

from mamba_slm.model.io import TOKENIZER_FILE
from mamba_slm.platform.extras import missing_extra
from mamba_slm.platform.post.loading import load_model_dir
from mamba_slm.platform.post.onnx_export import OnnxLM, export_onnx, max_logit_diff


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python jobs/export_onnx.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, type=Path, help="float model directory (save_pretrained)")
    p.add_argument("--output", required=True, type=Path, help="the .onnx file to write (must not exist)")
    p.add_argument("--dynamic-batch", action="store_true",
                   help="export a dynamic batch dimension (default: batch 1; export takes ~3x longer)")
    p.add_argument("--max-chunks", type=int,
                   help="longest sequence, in Mamba-2 chunks (default: 4x the trained context)")
    p.add_argument("--no-check", dest="check", action="store_false",
                   help="skip the onnxruntime-vs-PyTorch logit comparison")
    p.add_argument("--tolerance", type=float, default=1e-3,
                   help="largest allowed |logit difference| in the check (default 1e-3); exit 1 above it")
    return p


def check_output(output: Path, tokenizer: Path) -> str | None:
    """Why writing `output` and copying `tokenizer` beside it would destroy a file, or None."""
    # export_onnx saves weights over 2 GB beside the graph as <name>.data (onnxscript's naming)
    for path in (output, output.with_name(output.name + ".data")):
        if path.exists() or path.is_symlink():
            return f"--output: {path} exists; remove it or choose another path"
    if output.parent.exists() and not output.parent.is_dir():
        return f"--output: {output.parent} is a file, not a folder; choose another path"
    dest = output.parent / TOKENIZER_FILE
    # (a --checkpoint without a tokenizer.json is refused by load_model_dir, saying what it needs)
    if tokenizer.is_file() and dest.exists() and not (dest.is_file() and filecmp.cmp(dest, tokenizer, shallow=False)):
        return (f"--output: {dest} exists and differs from {tokenizer}, which would replace it; "
                f"choose another folder or remove it")
    return None


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.output.suffix != ".onnx":
        parser.error(f"--output {args.output}: give a file name ending in .onnx")
    if args.max_chunks is not None and args.max_chunks < 1:
        parser.error(f"--max-chunks {args.max_chunks} must be positive")
    if problem := check_output(args.output, args.checkpoint / TOKENIZER_FILE):
        parser.error(problem)
    # torch.onnx's exporter needs onnx and onnxscript; the check runs the file in onnxruntime
    if msg := missing_extra("post", ("onnx", "onnxscript") + (("onnxruntime",) if args.check else ()),
                            what="the ONNX export" + (" with its onnxruntime check" if args.check else "")):
        parser.error(msg)
    try:
        loaded = load_model_dir(args.checkpoint)
    except (FileNotFoundError, ValueError) as exc:
        parser.error(f"--checkpoint: {exc}")
    try:
        export_onnx(loaded.model, args.output, dynamic_batch=args.dynamic_batch, max_chunks=args.max_chunks)
    except ValueError as exc:
        parser.error(str(exc))
    tokenizer, dest = args.checkpoint / TOKENIZER_FILE, args.output.parent / TOKENIZER_FILE
    if not dest.exists():  # else the same file or a copy (check_output): --output in the model directory, say
        shutil.copyfile(tokenizer, dest)
    print(f"wrote {args.output} ({args.output.stat().st_size / 2**20:.2f} MiB)")
    if not args.check:
        return 0
    chunk = loaded.model.config.mamba_chunk_size
    onnx_model = OnnxLM(args.output, chunk, pad_id=loaded.eos_id)
    diff = max_logit_diff(loaded.model, onnx_model, [(1, chunk), (2, 3 * chunk), (3, 2 * chunk - 5)])
    print(f"onnxruntime vs PyTorch: max |logit diff| = {diff:.3g} (tolerance {args.tolerance:g})")
    return 0 if diff <= args.tolerance else 1


if __name__ == "__main__":
    sys.exit(main())
