"""Plan the cost of a pretraining run: GPU-hours, wall time and dollars, on-demand
versus spot (with the expected rework from preemptions, Young/Daly cadence).

  python jobs/plan.py --size 6.7B --tokens 100B --gpu A100-80GB --gpus 16 --spot

Every number says where it comes from: throughput measured by a benchmark
(cluster/data/throughput.json) or estimated from an assumed MFU; prices from the dated
table cluster/data/gpu_prices.json or your flags; spot assumptions from the flags below.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from mamba_slm.cluster.cost import SpotAssumptions, format_plan, parse_count, plan
from mamba_slm.cluster.spec import GPU_TYPES, MODEL_SIZES


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python jobs/plan.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", required=True, choices=MODEL_SIZES, help="model preset")
    p.add_argument("--tokens", required=True, help="training tokens, e.g. 100B, 2.5T, 300M")
    p.add_argument("--gpu", required=True, choices=GPU_TYPES)
    p.add_argument("--gpus", type=int, required=True, help="total GPUs")
    p.add_argument("--gpus-per-node", type=int, default=8)
    capacity = p.add_mutually_exclusive_group()
    capacity.add_argument("--spot", action="store_true", help="the plan line uses spot (both are shown)")
    capacity.add_argument("--on-demand", dest="spot", action="store_false")
    p.add_argument("--seq-len", type=int, help="sequence length (default: the preset's max_seq_len)")
    p.add_argument("--mfu", type=float, help="override the assumed model FLOPs utilisation (0-1)")
    p.add_argument("--on-demand-price", type=float, help="USD per GPU-hour")
    p.add_argument("--spot-price", type=float, help="USD per GPU-hour")
    p.add_argument("--preemptions-per-node-hour", type=float, default=SpotAssumptions.preemptions_per_node_hour,
                   help="spot reclaim rate per node (default %(default)s: one per node per 20 h)")
    p.add_argument("--checkpoint-write-s", type=float,
                   help="measured seconds to write one checkpoint (default: estimate from size)")
    p.add_argument("--restart-s", type=float, default=SpotAssumptions.restart_s,
                   help="seconds from a preemption to training again (default %(default)s)")
    p.add_argument("--throughput-table", type=Path, help="alternative throughput JSON")
    p.add_argument("--prices-table", type=Path, help="alternative prices JSON")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        tokens = parse_count(args.tokens)
    except ValueError:
        parser.error(f"--tokens {args.tokens!r}: give a positive count such as 100B, 2.5T or 3e11")
    if args.gpus_per_node < 1 or args.gpus < 1 or args.gpus % args.gpus_per_node:
        parser.error(f"--gpus {args.gpus} must be a positive multiple of --gpus-per-node {args.gpus_per_node}")
    if args.mfu is not None and not 0 < args.mfu <= 1:
        parser.error(f"--mfu {args.mfu} must be in (0, 1]")
    for flag in ("on_demand_price", "spot_price", "preemptions_per_node_hour", "checkpoint_write_s", "seq_len"):
        value = getattr(args, flag)
        if value is not None and not (math.isfinite(value) and value > 0):  # nan compares False
            parser.error(f"--{flag.replace('_', '-')} {value} must be a finite number > 0")
    if not (math.isfinite(args.restart_s) and args.restart_s >= 0):
        parser.error(f"--restart-s {args.restart_s} must be a finite number >= 0")
    spot = SpotAssumptions(preemptions_per_node_hour=args.preemptions_per_node_hour,
                           checkpoint_write_s=args.checkpoint_write_s, restart_s=args.restart_s)
    try:
        result = plan(args.size, tokens, args.gpu, args.gpus, args.gpus_per_node, seq_len=args.seq_len,
                      mfu=args.mfu, on_demand_price=args.on_demand_price, spot_price=args.spot_price,
                      spot=spot, throughput_table=args.throughput_table, prices_table=args.prices_table)
    except (ValueError, OSError, KeyError) as exc:
        parser.error(str(exc))
    print(format_plan(result, highlight_spot=args.spot))
    return 0


if __name__ == "__main__":
    sys.exit(main())
