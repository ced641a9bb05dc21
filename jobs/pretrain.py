"""Pretrain a hybrid Mamba-2/attention language model on Ray Train + DeepSpeed.

    python jobs/pretrain.py                      # laptop: local Ray, tiny model, demo corpus
    python jobs/pretrain.py --print-configs      # the training presets
    python jobs/pretrain.py --help               # every flag

Under `ray job submit ... -- python jobs/pretrain.py ...` it joins that cluster
(RAY_ADDRESS). Exit codes: 0 done, 1 training stopped or failed, 2 bad arguments, 75 stopped
by a preemption notice after writing its checkpoint (run the same command again to continue;
the KubeRay RayJob of jobs/launch.py retries it on a fresh cluster).
"""
from __future__ import annotations

import sys

from mamba_slm.platform.train.cli import build_parser, configs_from_args, model_overrides_from_args
from mamba_slm.platform.train.config import format_presets

EXIT_PREEMPTED = 75  # EX_TEMPFAIL (sysexits.h): try again


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.print_configs:
        print(format_presets())
        return 0
    try:
        training, data, run = configs_from_args(args)
        from mamba_slm.platform.train.launcher import resolve_job

        # also checks the batch against every worker count an elastic run may get
        job = resolve_job(training, data, run, model_overrides_from_args(args, training))
    except (ValueError, FileNotFoundError) as err:
        parser.print_usage(sys.stderr)
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return 2
    from mamba_slm.platform.train.launcher import run_pretraining, summarize

    result = run_pretraining(job)
    print(summarize(job, result))
    if result.stop_reason:
        return 1
    step = result.last.get("step", 0)
    if result.last.get("preempted") and step < job.training.max_steps:
        # Not finished: a KubeRay RayJob (backoffLimit) or any retrying runner must run it
        # again, and exit 0 would mark it succeeded and tear the cluster down.
        print(f"{parser.prog}: preempted ({result.last['preempted']}) at step {step} of "
              f"{job.training.max_steps}; the checkpoint is written: run the same command again to "
              f"continue (exit {EXIT_PREEMPTED})", file=sys.stderr)
        return EXIT_PREEMPTED
    return 0


if __name__ == "__main__":
    sys.exit(main())
