"""Chaos run: a tiny pretraining run on Ray Train under random worker crashes (SIGKILL),
preemptions (SIGTERM, then resubmission) and checkpoint corruption; prints what was
injected and survived, and what the sample ledger says was lost or repeated.

    python jobs/chaos.py                       # 24 steps, 3 crashes, 2 preemptions, 2 workers
    python jobs/chaos.py --seed 7 --steps 40 --crashes 5 --preemptions 3
    python jobs/chaos.py --workers 2 --min-workers 1   # resubmissions on 1 or 2 workers
    python jobs/chaos.py --use-gpu                     # one GPU per worker: NCCL, bf16, the kernels

The last line is always `faults injected N, survived N, samples lost N, repeated N` (then
`, trained past the checkpoint's position N` if any were). Exit codes: 0 every fault
survived with no sample lost, repeated or trained past the final checkpoint's position,
1 otherwise, 2 bad arguments.
"""
from __future__ import annotations

import argparse
import math
import random
import sys
import tempfile
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python jobs/chaos.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=None, help="seed of the fault plan (default: random, printed)")
    p.add_argument("--steps", type=int, default=24, help="optimizer steps of the run (default 24)")
    p.add_argument("--crashes", type=int, default=3, help="worker SIGKILLs (default 3)")
    p.add_argument("--preemptions", type=int, default=2, help="worker SIGTERMs (default 2)")
    p.add_argument("--workers", type=int, default=2, help="Ray Train workers (default 2)")
    p.add_argument("--min-workers", type=int, default=0,
                   help="resubmit each time on a random number of workers in [min, --workers] "
                        "(default 0: always --workers)")
    p.add_argument("--checkpoint-every", type=int, default=3, help="steps between checkpoints (default 3)")
    p.add_argument("--use-gpu", action="store_true", help="one GPU per worker (NCCL, bf16, the GPU kernels)")
    p.add_argument("--out", default="", help="working directory (default: a new temporary one)")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.steps < 2 or args.crashes < 0 or args.preemptions < 0 or args.workers < 1 or args.checkpoint_every < 1:
        parser.error("--steps must be >= 2, --workers and --checkpoint-every >= 1, --crashes and "
                     "--preemptions >= 0")
    if not 0 <= args.min_workers <= args.workers:
        parser.error(f"--min-workers {args.min_workers} must be between 0 and --workers ({args.workers})")
    if args.crashes + args.preemptions > args.steps:
        parser.error(f"--crashes + --preemptions ({args.crashes + args.preemptions}) cannot exceed "
                     f"--steps ({args.steps}): at most one fault per step")
    if args.use_gpu:
        import torch

        if torch.cuda.device_count() < args.workers:
            parser.error(f"--use-gpu needs a GPU per worker: {args.workers} workers, "
                         f"{torch.cuda.device_count()} GPUs here")
    seed = args.seed if args.seed is not None else random.randrange(10**6)
    out = Path(args.out or tempfile.mkdtemp(prefix="chaos-")).resolve()
    from mamba_slm.platform.fault.chaos import run_chaos
    from mamba_slm.platform.train.config import DataConfig, RunConfig, TrainingConfig
    from mamba_slm.platform.train.launcher import resolve_job
    from mamba_slm.platform.train.synthetic import write_synthetic_dataset

    data = write_synthetic_dataset(out / "data", seq_len=64, vocab_size=256, train_rows=512, val_rows=32,
                                   shards=2, row_group=64)
    # Divisible by 2 x every worker count the run may get (micro-batch 2), at least 4 per worker.
    base = 2 * math.lcm(*range(max(1, args.min_workers or args.workers), args.workers + 1))
    batch = base * math.ceil(4 * args.workers / base)

    def job_factory(hooks, max_failures, workers):
        t = TrainingConfig(max_steps=args.steps, global_batch_size=batch, micro_batch_size=2, warmup_steps=2,
                           checkpoint_every=args.checkpoint_every, seed=seed)
        run = RunConfig(name=f"chaos-{seed}", num_workers=workers, output_dir=str(out / "run"),
                        storage_path=str(out / "storage"), wandb=False, plot=False,
                        max_failures=max_failures, log_every=max(1, args.steps // 4), use_gpu=args.use_gpu)
        return resolve_job(t, DataConfig(path=str(data)), run, hooks=hooks)

    report = run_chaos(job_factory, out, seed, args.steps, args.crashes, args.preemptions, args.workers,
                       min_workers=args.min_workers)
    print(f"run directory: {out}")
    print(report.line())
    ok = (report.finished and report.survived == report.injected and report.lost == 0 and report.repeated == 0
          and report.beyond == 0)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
