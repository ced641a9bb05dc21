"""The sweep driver: build (or restore) the Tuner, run it, write the results.

Resources per trial:
- `workers_per_trial=0` (default): the trial trains in one Ray task (the pretraining
  job's local mode: the same loop and DeepSpeed engine, no worker group to start) placed
  in the trial's own placement group, with `cpus_per_trial` CPUs (fractions pack small
  proxies) and `gpus_per_trial` GPUs (1 on a GPU node; 0.5 puts two small proxies on one
  card). Tune runs as many trials at once as the cluster holds.
- `workers_per_trial=N`: data-parallel Ray Train workers (1 GPU each on GPU nodes); the
  trial actor itself holds 0.01 CPU (0 is rejected) and Tune caps concurrency so that
  every running trial's workers fit the cluster (Train's resources are not reserved by
  Tune; too many trials would wait on each other).

Resume: the Tune experiment lives in the sweep directory; `Tuner.restore` continues it.
Finished trials are not run again, unfinished and errored ones continue from their last
rung (trial.py), and the searcher's and ASHA's state come back with it.
"""
from __future__ import annotations

import gc
import math
import os
from dataclasses import dataclass
from pathlib import Path

from mamba_slm.platform.train.launcher import ensure_ray as _ensure_ray

from .config import SweepConfig
from .results import SweepResults, collect_results, write_results
from .trial import prune_trial, train_trial

METRIC, MODE = "val_loss", "min"


def ensure_ray(use_gpu: bool) -> None:
    """The training job's Ray start-up, with the dashboard on: Tune trials that start Ray
    Train worker groups hang without it (FIELD-NOTES)."""
    _ensure_ray(use_gpu, include_dashboard=True, log_to_driver=False)


@dataclass
class SweepRun:
    results: SweepResults
    interrupted: bool


def trial_resources(cfg: SweepConfig):
    """The trial's placement group: bundle 0 for the trial actor (it only waits), bundle 1
    for the task that trains (trial.run_rung). With Ray Train workers, Train reserves its
    own; the trial holds bundle 0 only."""
    from ray import tune

    bundles = [{"CPU": 0.01}]
    if not cfg.workers_per_trial:
        bundles.append({"CPU": cfg.cpus_per_trial, **({"GPU": cfg.gpus_per_trial} if cfg.use_gpu else {})})
    return tune.PlacementGroupFactory(bundles)


def max_concurrent(cfg: SweepConfig, cluster: dict[str, float]) -> int:
    """Trials that can train at once (0 = Tune's own limit, the trials' resources)."""
    if cfg.max_concurrent:
        return cfg.max_concurrent
    if not cfg.workers_per_trial:
        return 0
    per_trial = {"CPU": cfg.workers_per_trial * cfg.cpus_per_trial}
    if cfg.use_gpu:
        per_trial["GPU"] = cfg.workers_per_trial * math.ceil(cfg.gpus_per_trial)
    fits = min(int(cluster.get(k, 0) // v) for k, v in per_trial.items())
    if fits < 1:
        raise ValueError(f"one trial needs {per_trial} but the cluster has {cluster}: lower "
                         "--workers-per-trial or --cpus-per-trial")
    return fits


def build_tuner(cfg: SweepConfig, resume: bool):
    import ray
    from ray import tune

    trainable = tune.with_resources(tune.with_parameters(train_trial, sweep=cfg.to_dict()),
                                    trial_resources(cfg))
    sweep_dir = Path(cfg.output_dir)
    if resume:
        return tune.Tuner.restore(str(sweep_dir), trainable, resume_unfinished=True, resume_errored=True,
                                  param_space=cfg.space.param_space())
    tune_config = tune.TuneConfig(
        metric=METRIC, mode=MODE, num_samples=cfg.trials, search_alg=build_searcher(cfg),
        scheduler=build_scheduler(cfg), max_concurrent_trials=max_concurrent(cfg, ray.cluster_resources()) or None)
    run_config = tune.RunConfig(
        name=sweep_dir.name, storage_path=str(sweep_dir.parent), callbacks=callbacks(cfg),
        checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
        failure_config=tune.FailureConfig(max_failures=1), verbose=1)
    return tune.Tuner(trainable, param_space=cfg.space.param_space(), tune_config=tune_config,
                      run_config=run_config)


def build_searcher(cfg: SweepConfig):
    if cfg.searcher == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(seed=cfg.seed)  # TPE, Optuna's default sampler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    return BasicVariantGenerator(random_state=cfg.seed)


def build_scheduler(cfg: SweepConfig):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if not cfg.asha:
        return FIFOScheduler()
    # Rungs at the steps trials report (trial.py); ASHA keeps the best 1/reduction_factor
    # of the trials at each rung it reaches (Li et al. 2020, "A System for Massively
    # Parallel Hyperparameter Tuning").
    return ASHAScheduler(time_attr="step", max_t=cfg.steps, grace_period=cfg.rung_steps()[0],
                         reduction_factor=cfg.reduction_factor)


def callbacks(cfg: SweepConfig) -> list:
    from ray import tune

    class PruneFinishedTrials(tune.Callback):
        """Finished trials (done or stopped by ASHA) give back their optimizer state's disk."""

        def on_trial_complete(self, iteration, trials, trial, **info):
            prune_trial(cfg.trial_dir(trial.trial_id))

    out: list = [PruneFinishedTrials()]
    if cfg.wandb:
        from ray.air.integrations.wandb import WandbLoggerCallback

        if not os.environ.get("WANDB_API_KEY") and not os.environ.get("WANDB_MODE"):
            os.environ["WANDB_MODE"] = "offline"  # no key: runs are kept under <sweep>/wandb

        class EndEveryWandbRun(WandbLoggerCallback):
            """Ray's callback ends a trial's wandb run when the trial ends; a sweep stopped
            by Ctrl-C leaves running trials unended, and their logging actors would keep
            `fit()` waiting for `upload_timeout` (30 min by default). End them all."""

            def on_experiment_end(self, trials, **info):
                for trial in list(self._trial_queues):
                    self._signal_logging_actor_stop(trial=trial)
                super().on_experiment_end(trials, **info)

        out.append(EndEveryWandbRun(project=cfg.wandb_project, group=cfg.name, dir=cfg.output_dir,
                                    mode=os.environ["WANDB_MODE"] if os.environ.get("WANDB_MODE") else None,
                                    excludes=["stop_reason"], upload_timeout=300))
    return out


def run_sweep(cfg: SweepConfig, resume: bool = False, log=print) -> SweepRun:
    from ray import tune

    ensure_ray(cfg.use_gpu)
    if resume and not tune.Tuner.can_restore(cfg.output_dir):
        raise FileNotFoundError(f"{cfg.output_dir} holds no Tune experiment state to resume")
    if not resume:
        cfg.save()
    log(f"sweep {cfg.name}: {cfg.trials} trials of {cfg.proxy}, {cfg.steps} steps each "
        f"(validated at {cfg.rung_steps()}), searcher {cfg.searcher}, "
        f"{'ASHA' if cfg.asha else 'no early stopping'}; per trial {trial_resources(cfg).bundles}"
        f"{f' + {cfg.workers_per_trial} Ray Train workers' if cfg.workers_per_trial else ''}; "
        f"{'resuming ' if resume else ''}in {cfg.output_dir}")
    tuner = build_tuner(cfg, resume)
    tuner.fit()
    del tuner  # its wandb callback's finaliser must run while Ray is still importable,
    gc.collect()  # not at interpreter exit (an AttributeError is printed then)
    results = collect_results(cfg)
    write_results(cfg, results, log=log)
    interrupted = results.unfinished > 0
    if interrupted:
        log(f"{results.unfinished} trial(s) unfinished: continue with\n  python jobs/tune_sweep.py "
            f"--resume --output-dir {cfg.output_dir}")
    return SweepRun(results, interrupted)
