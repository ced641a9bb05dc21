"""Print the preset table: `python -m mamba_slm.model [--sizes 1.3B 6.7B ...]`.

Models are built on the meta device, so the counts are exact and nothing is allocated.
"""
from __future__ import annotations

import argparse
import sys

import torch

from .config import PRESETS, SEED_PARAMS, ModelConfig
from .hybrid import HybridLM

GIB = 1024 ** 3
# Mixed-precision AdamW state per parameter: bf16 weight + bf16 grad + fp32 master
# + two fp32 moments (ZeRO paper, Rajbhandari et al. 2020, sec. 3.1: 16 bytes).
TRAIN_BYTES_PER_PARAM = 16


def activation_bytes(cfg: ModelConfig, micro_batch: int = 1) -> int:
    """Activations with per-block checkpointing: one bf16 hidden state per block
    boundary, plus one block's full activations during its recompute (~34 bytes per
    token per hidden unit in a transformer layer; Korthikanti et al. 2022, eq. 1)."""
    tokens = micro_batch * cfg.max_seq_len
    return tokens * cfg.hidden_size * (2 * cfg.n_layers + 34)


def size_rows(names: list[str]) -> list[dict]:
    rows = []
    for name in names:
        cfg = ModelConfig.from_name(name)
        with torch.device("meta"):
            n = HybridLM(cfg).num_parameters()
        state = n * TRAIN_BYTES_PER_PARAM
        rows.append(dict(
            preset=name, layers=cfg.n_layers, hidden=cfg.hidden_size, heads=cfg.n_heads,
            kv_heads=cfg.n_kv_heads, context=cfg.max_seq_len, pattern=cfg.layer_pattern,
            params=n, seed=SEED_PARAMS.get(name), bf16_gib=2 * n / GIB,
            train_gib=(state + activation_bytes(cfg)) / GIB,
            zero3_x8_gib=(state / 8 + activation_bytes(cfg)) / GIB))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mamba_slm.model", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=list(PRESETS), metavar="PRESET",
                        help=f"presets to show (default: all of {', '.join(PRESETS)})")
    args = parser.parse_args(argv)
    unknown = [s for s in args.sizes if s not in PRESETS]
    if unknown:
        parser.error(f"unknown preset(s) {unknown}; choose from {list(PRESETS)}")
    from rich.console import Console
    from rich.table import Table
    table = Table(title="mamba-slm presets (A = attention, M = Mamba-2)")
    for col in ("preset", "layers", "hidden", "heads", "kv", "ctx", "layer pattern", "params",
                "vs seed", "bf16 weights", "train mem, 1 GPU*", "ZeRO-3 x8 /GPU*"):
        table.add_column(col, justify="left" if col in ("preset", "layer pattern") else "right")
    for r in size_rows(args.sizes):
        params = f"{r['params'] / 1e9:.2f}B" if r["params"] >= 1e9 else f"{r['params'] / 1e6:.1f}M"
        vs_seed = f"{r['params'] / r['seed']:.3f}" if r["seed"] else "-"
        table.add_row(r["preset"], str(r["layers"]), str(r["hidden"]), str(r["heads"]), str(r["kv_heads"]),
                      str(r["context"]), r["pattern"], params, vs_seed, f"{r['bf16_gib']:.2f} GiB",
                      f"{r['train_gib']:.1f} GiB", f"{r['zero3_x8_gib']:.1f} GiB")
    console = Console(width=200)
    console.print(table)
    console.print("* 16 bytes/parameter of mixed-precision AdamW state plus activations of one "
                  "micro-batch at full context with per-block activation checkpointing.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
