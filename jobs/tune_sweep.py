"""Sweep layer placement and learning rate on a small proxy with Ray Tune.

    python jobs/tune_sweep.py --proxy 50M --trials 32 --data-path data/curated
    python jobs/tune_sweep.py --resume --output-dir runs/sweeps/<name>   # after an interruption
    python jobs/pretrain.py --size 1.3B --layout-from runs/sweeps/<name> ...

Under `ray job submit ... -- python jobs/tune_sweep.py ...` it joins that cluster.
Exit codes: 0 done, 1 trials left unfinished (interrupted: --resume continues), 2 bad arguments.
"""
from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path

EXAMPLES = """
examples:
  python jobs/tune_sweep.py --proxy 10M --trials 16 --steps 100            # demo corpus, CPU
  python jobs/tune_sweep.py --proxy 50M --trials 32 --data-path /data/curated --gpus-per-trial 1
  python jobs/tune_sweep.py --proxy 50M --searcher optuna --placements strategic,uniform \\
      --attn-ratios 0.08,0.17,0.25 --patterns AMMMMMAMMMMM,MMMMMAMMMMMA --model-choice mamba_d_state=32,64
  python jobs/tune_sweep.py --resume --output-dir runs/sweeps/layout-50M
  python jobs/pretrain.py --size 1.3B --training-config small_scale --layout-from runs/sweeps/layout-50M

Outputs in the sweep directory: trials.csv (also printed), sweep.png, best_layout.json.
"""


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated numbers") from None


def _words(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python jobs/tune_sweep.py", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Ray Tune sweep of the hybrid layout (attention ratio, placement rule, "
                    "verbatim patterns) and optimisation (learning rate, warmup, ...) on a small "
                    "proxy. Each trial trains with jobs/pretrain.py's code path and reports its "
                    "validation loss; ASHA stops weak trials early.", epilog=EXAMPLES)
    g = p.add_argument_group("what to train")
    g.add_argument("--proxy", default="50M", help="proxy preset: 10M | 50M | 150M | tiny (default 50M)")
    g.add_argument("--data-path", "--data_path", default="",
                   help="curated data directory (default: the demo corpus, built once)")
    g.add_argument("--trials", type=int, default=32, help="trials to run (default 32)")
    g.add_argument("--steps", type=int, default=200, help="optimizer steps of a full trial (default 200)")
    g.add_argument("--rungs", type=int, default=4,
                   help="validation points per trial; ASHA may stop a trial at each (default 4)")
    g.add_argument("--global-batch-size", type=int, default=32, help="sequences per step (default 32)")
    g.add_argument("--micro-batch-size", type=int, default=8, help="sequences per forward (default 8)")
    g.add_argument("--eval-batches", type=int, default=20,
                   help="validation batches (of micro-batch-size rows) per rung (default 20)")
    s = p.add_argument_group("search space")
    s.add_argument("--attn-ratios", type=_floats, default=[0.1, 0.2, 0.3, 0.5],
                   help="attention fractions to try (rounded to whole layers; default 0.1,0.2,0.3,0.5)")
    s.add_argument("--placements", type=_words, default=["strategic", "uniform", "front", "back"],
                   help="placement rules: strategic,uniform,front,back (default all; '' = none)")
    s.add_argument("--patterns", type=_words, default=[],
                   help="verbatim layer patterns to try, one letter per proxy layer (e.g. AMMMAMMM)")
    s.add_argument("--lr-min", type=float, default=3e-4, help="learning rate, log-uniform from (default 3e-4)")
    s.add_argument("--lr-max", type=float, default=1e-2, help="... to (default 1e-2)")
    s.add_argument("--warmup-fractions", type=_floats, default=[0.02, 0.05, 0.1],
                   help="warmup as a fraction of --steps (default 0.02,0.05,0.1)")
    s.add_argument("--model-choice", action="append", default=[], metavar="FIELD=V1,V2",
                   help="also sweep a ModelConfig field, e.g. mamba_d_state=32,64 (repeatable)")
    s.add_argument("--train-choice", action="append", default=[], metavar="FIELD=V1,V2",
                   help="also sweep a TrainingConfig field, e.g. weight_decay=0,0.1 (repeatable)")
    a = p.add_argument_group("search and scheduling")
    a.add_argument("--searcher", choices=["random", "optuna"], default="random",
                   help="random search, or Optuna TPE (model-based) (default random)")
    a.add_argument("--no-asha", action="store_true", help="train every trial to the end")
    a.add_argument("--reduction-factor", type=int, default=3, help="ASHA keeps 1/N per rung (default 3)")
    a.add_argument("--seed", type=int, default=0, help="seed of the searcher and of every trial's training")
    r = p.add_argument_group("resources and output")
    r.add_argument("--cpus-per-trial", type=float, default=1.0,
                   help="CPUs per trial (or per Ray Train worker); fractions pack trials (default 1)")
    r.add_argument("--gpus-per-trial", type=float, default=None,
                   help="GPUs per trial: default 1 when the cluster has GPUs, else 0; 0.5 packs two")
    r.add_argument("--workers-per-trial", type=int, default=0,
                   help="0 (default): a trial trains in its own process; N: on N Ray Train "
                        "workers (data parallel, for proxies too big for one device)")
    r.add_argument("--max-concurrent", type=int, default=0,
                   help="trials running at once (default: as many as resources allow)")
    r.add_argument("--name", default="", help="sweep name (default layout-<proxy>-<time>)")
    r.add_argument("--output-dir", "--output_dir", default="",
                   help="sweep directory (default runs/sweeps/<name>)")
    r.add_argument("--resume", action="store_true",
                   help="continue the interrupted sweep in --output-dir with its saved settings; "
                        "finished trials are not run again")
    r.add_argument("--no-wandb", action="store_true", help="do not log trials to wandb "
                   "(default: log; offline without WANDB_API_KEY)")
    return p


def config_from_args(args: argparse.Namespace):
    from mamba_slm.tune.config import SweepConfig, proxy_preset
    from mamba_slm.tune.space import SearchSpace, parse_choices

    if args.resume:
        if not args.output_dir:
            raise ValueError("--resume needs --output-dir <sweep dir>")
        return SweepConfig.load(args.output_dir)
    preset = proxy_preset(args.proxy)
    name = args.name or f"layout-{preset}-{time.strftime('%Y%m%d-%H%M%S')}"
    output = Path(args.output_dir or Path("runs") / "sweeps" / name).resolve()
    data = args.data_path
    if not data:
        from mamba_slm.platform.data import ensure_demo_data

        data = str(ensure_demo_data())
    elif not (Path(data) / "manifest.json").is_file():
        raise FileNotFoundError(f"--data-path {data}: no manifest.json there (curate data with "
                                "jobs/curate.py, or leave --data-path out for the demo corpus)")
    space = SearchSpace(attn_ratios=args.attn_ratios, placements=args.placements, patterns=args.patterns,
                        lr_min=args.lr_min, lr_max=args.lr_max, warmup_fractions=args.warmup_fractions,
                        model_choices=parse_choices(args.model_choice),
                        training_choices=parse_choices(args.train_choice))
    from mamba_slm.model import ModelConfig

    space.check_depth(ModelConfig.from_name(preset).n_layers)
    gpus = args.gpus_per_trial if args.gpus_per_trial is not None else _default_gpus()
    return SweepConfig(
        name=output.name, output_dir=str(output), data_path=str(Path(data).resolve()), proxy=preset,
        trials=args.trials, steps=args.steps, rungs=args.rungs, global_batch_size=args.global_batch_size,
        micro_batch_size=args.micro_batch_size, eval_batches=args.eval_batches, searcher=args.searcher,
        asha=not args.no_asha, reduction_factor=args.reduction_factor, seed=args.seed,
        cpus_per_trial=args.cpus_per_trial, gpus_per_trial=gpus, workers_per_trial=args.workers_per_trial,
        max_concurrent=args.max_concurrent, wandb=not args.no_wandb, space=space)


def _default_gpus() -> float:
    """1 GPU per trial when the cluster (RAY_ADDRESS) or, for a local one, this machine has GPUs."""
    import os

    import ray

    if not os.environ.get("RAY_ADDRESS") and not ray.is_initialized():
        import torch

        return 1.0 if torch.cuda.is_available() else 0.0
    from mamba_slm.tune.sweep import ensure_ray

    ensure_ray(use_gpu=False)
    return 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        cfg = config_from_args(args)
        if cfg.searcher == "optuna":  # (a resumed sweep's searcher comes from its sweep.json)
            from mamba_slm.platform.extras import missing_extra

            if msg := missing_extra("tune", what="--searcher optuna"):
                raise ValueError(msg)
    except (ValueError, FileNotFoundError) as err:
        parser.print_usage(sys.stderr)
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return 2
    if args.resume:
        print(f"resuming {cfg.output_dir} with the settings saved in its sweep.json")
    # `ray job stop` sends SIGTERM: treat it as Ctrl-C, which Tune answers by saving the
    # experiment state so that --resume continues it.
    signal.signal(signal.SIGTERM, lambda *_: signal.raise_signal(signal.SIGINT))
    from mamba_slm.tune.sweep import run_sweep

    try:
        run = run_sweep(cfg, resume=args.resume)
    except (ValueError, FileNotFoundError) as err:
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return 2
    return 1 if run.interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
