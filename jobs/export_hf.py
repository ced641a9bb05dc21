"""Export a checkpoint to a Hugging Face transformers `BambaForCausalLM` directory, or
import one back into this project's model directory format.

  python jobs/export_hf.py --checkpoint runs/x/final --output runs/x/hf
  python jobs/export_hf.py --from-hf runs/x/hf --output runs/x/from-hf

The export holds config.json (attn_layer_indices, the Mamba-2 fields, and this project's
full config under "mamba_slm_config"), model.safetensors and the tokenizer files
(PreTrainedTokenizerFast over tokenizer.json); `AutoModelForCausalLM.from_pretrained`
loads it with no custom code. Before writing, the Bamba model's logits are compared with
this project's on random tokens (CPU, fp32) and the export is refused above 1e-4.
Configurations Bamba cannot express (rotary_fraction != 0.5, rope_scaling other than
linear, a layer_pattern without attention layers) are refused with the field named, and
a refused or failed export leaves nothing behind. Runs on the CPU.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python jobs/export_hf.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", type=Path, help="this project's model (or training checkpoint) dir to export")
    source.add_argument("--from-hf", type=Path, metavar="HF_DIR", help="a BambaForCausalLM dir to import")
    p.add_argument("--output", type=Path, required=True, help="directory to write (must not exist or be empty)")
    p.add_argument("--tokenizer", type=Path, help="tokenizer.json for --checkpoint (default: the one inside it)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="dtype of the exported weights (default %(default)s; checked in fp32 first)")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    source = args.checkpoint or args.from_hf
    if not source.is_dir():
        parser.error(f"{source} is not a directory")
    if args.output.exists() and (not args.output.is_dir() or any(args.output.iterdir())):
        parser.error(f"--output {args.output} exists and is not empty: choose a new directory")

    from mamba_slm.model.convert_hf import UnsupportedConversion
    from mamba_slm.platform.evaluate.checkpoint import CheckpointError
    from mamba_slm.platform.evaluate.hf import export_hf, import_hf
    try:
        if args.checkpoint:
            info = export_hf(args.checkpoint, args.output, tokenizer_file=args.tokenizer, dtype=args.dtype)
            print(f"wrote BambaForCausalLM to {info['output']} ({info['dtype']}, attention layers "
                  f"{info['attn_layer_indices']}); max |logit diff| vs this project's model "
                  f"{info['max_logit_diff']:.2e} (tolerance {info['atol']:.0e}, CPU fp32)")
        else:
            out = import_hf(args.from_hf, args.output)
            print(f"wrote this project's model directory to {out}")
    except (UnsupportedConversion, CheckpointError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
