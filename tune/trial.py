"""One trial of a sweep: train a proxy with `jobs/pretrain.py`'s code path and report its
validation loss at each rung.

The trial is a Tune function trainable that drives `platform.train` (the Train-in-Tune
pattern of the Ray docs): for each rung it builds the same `JobSpec` the pretraining job
builds (`resolve_job`) and runs `run_pretraining`. Rungs are stages of one run: every
stage raises `max_steps` and resumes from the trial's own training checkpoint (the job's
exact resume: weights, optimizer, data position, RNG), while `schedule_steps` keeps one
learning-rate schedule over the whole budget, so a trial trained in four stages follows
the same curve as one trained straight through. After each stage the final model is
scored on the validation split (`platform.evaluate.perplexity`) and reported to Tune with
a small checkpoint naming the rung, so ASHA can stop the trial there and a restored sweep
continues an unfinished trial at its next rung.

    <sweep dir>/trials/<trial id>/   metrics.jsonl, model/ (latest rung), events.jsonl,
                                     checkpoints/<trial id>/step_*/ (training checkpoints)
"""
from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from mamba_slm.platform.train.config import DataConfig, RunConfig, TrainingConfig

from .config import SweepConfig
from .space import TrialSettings

RUNG_FILE = "rung.json"
EVENTS_FILE = "events.jsonl"


def train_trial(config: dict[str, Any], sweep: dict[str, Any]) -> None:
    """Tune entry point (`tune.with_parameters(train_trial, sweep=SweepConfig.to_dict())`)."""
    from ray import tune

    cfg = SweepConfig.from_dict(sweep)
    trial_id = tune.get_context().get_trial_id()
    out = cfg.trial_dir(trial_id)
    out.mkdir(parents=True, exist_ok=True)
    done = completed_rungs(tune.get_checkpoint())
    log_event(out, "start", rungs_done=done)
    started = time.perf_counter()
    for rung, steps in enumerate(cfg.rung_steps()):
        if rung < done:
            continue
        metrics = run_rung(cfg, config, trial_id, steps)
        metrics.update(rung=rung + 1, trial_time_s=time.perf_counter() - started)
        log_event(out, "rung", **metrics)
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / RUNG_FILE).write_text(json.dumps(metrics))
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(tmp))
        if metrics["stop_reason"]:  # diverged (bad steps in a row): its loss so far is its result
            break


def run_rung(cfg: SweepConfig, config: dict[str, Any], trial_id: str, steps: int) -> dict[str, Any]:
    """Train the trial up to `steps` and validate. With `workers_per_trial=0` this runs in a
    Ray task on the second bundle of the trial's placement group (sweep.trial_resources):
    the pretraining job's local mode (the same loop, DeepSpeed engine and checkpoints) can
    not run in the trial's own process, where Ray forbids Train's API inside Tune."""
    if cfg.workers_per_trial:
        return train_and_validate(cfg.to_dict(), config, trial_id, steps)
    import ray
    from ray.util import get_current_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    task = ray.remote(train_and_validate).options(
        num_cpus=cfg.cpus_per_trial, num_gpus=cfg.gpus_per_trial,
        scheduling_strategy=PlacementGroupSchedulingStrategy(get_current_placement_group(),
                                                             placement_group_bundle_index=1))
    return ray.get(task.remote(cfg.to_dict(), config, trial_id, steps))


def train_and_validate(sweep: dict[str, Any], config: dict[str, Any], trial_id: str,
                       steps: int) -> dict[str, Any]:
    """One stage of a trial: `run_pretraining` up to `steps`, then the validation loss."""
    from mamba_slm.platform.train.launcher import resolve_job, run_pretraining

    cfg = SweepConfig.from_dict(sweep)
    settings = TrialSettings.from_config(config)
    job = resolve_job(*trial_configs(cfg, settings, trial_id, steps), model_overrides=settings.model_overrides())
    result = run_pretraining(job)
    val = validate(cfg, Path(result.output_dir) / "model")
    last = result.last
    return {"val_loss": val["loss"], "val_ppl": val["ppl"], "step": int(last.get("step", steps)),
            "train_loss": last.get("loss"), "lr_peak": settings.lr,
            "warmup_steps": job.training.warmup_steps, "layer_pattern": job.model.layer_pattern,
            "n_layers": job.model.n_layers,
            "attn_fraction": job.model.layer_pattern.count("A") / job.model.n_layers,
            "tokens_per_s": last.get("tokens_per_s"), "stop_reason": result.stop_reason}


def trial_configs(cfg: SweepConfig, settings: TrialSettings, trial_id: str,
                  steps: int) -> tuple[TrainingConfig, DataConfig, RunConfig]:
    """The three configs of `jobs/pretrain.py` for stage `steps` of a trial."""
    out = cfg.trial_dir(trial_id)
    training = TrainingConfig(**{
        "name": "sweep", "model_size": cfg.proxy, "max_steps": steps, "schedule_steps": cfg.steps,
        "lr": settings.lr, "warmup_steps": settings.warmup_steps(cfg.steps),
        "global_batch_size": cfg.global_batch_size, "micro_batch_size": cfg.micro_batch_size,
        "checkpoint_every": 0, "seed": cfg.seed, **settings.training})
    run = RunConfig(name=trial_id, output_dir=str(out), storage_path=str(out / "checkpoints"),
                    num_workers=cfg.workers_per_trial, use_gpu=cfg.use_gpu,
                    cpus_per_worker=cfg.cpus_per_trial, wandb=False, plot=False,
                    log_every=cfg.steps, keep_checkpoints=1)
    return training, DataConfig(path=cfg.data_path), run


def validate(cfg: SweepConfig, model_dir: Path) -> dict[str, Any]:
    """Validation loss of the model in `model_dir`, where the training ran (on its GPU if
    it had one); a trial whose training ran on Ray Train GPU workers scores in a task with
    one GPU, started after those workers let theirs go."""
    if cfg.workers_per_trial and cfg.use_gpu:
        import ray

        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        # Outside the trial's placement group, which holds no GPU in this mode.
        task = ray.remote(num_gpus=1, num_cpus=1)(score_model).options(
            scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=None))
        return ray.get(task.remote(str(model_dir), cfg.data_path, cfg.eval_batches, cfg.micro_batch_size, True))
    return score_model(str(model_dir), cfg.data_path, cfg.eval_batches, cfg.micro_batch_size, cfg.use_gpu)


def score_model(model_dir: str, data_path: str, batches: int, batch_size: int, use_gpu: bool) -> dict:
    import torch

    from mamba_slm.platform.evaluate import perplexity
    from mamba_slm.platform.train.checkpoint import load_model

    device = "cuda" if use_gpu else "cpu"
    model = load_model(model_dir, device=device)
    with torch.no_grad():
        return perplexity(model, data_path, split="val", max_batches=batches, batch_size=batch_size,
                          autocast_dtype=torch.bfloat16 if use_gpu else None)


def completed_rungs(checkpoint) -> int:
    """Rungs a (restored) trial has already reported: 0 for a fresh trial."""
    if checkpoint is None:
        return 0
    with checkpoint.as_directory() as d:
        return int(json.loads((Path(d) / RUNG_FILE).read_text())["rung"])


def log_event(trial_dir: Path, event: str, **fields: Any) -> None:
    """One line per trial start and per rung: how often a trial ran shows after a resume."""
    with open(trial_dir / EVENTS_FILE, "a") as f:
        f.write(json.dumps({"event": event, "time": time.time(), **fields}) + "\n")


def prune_trial(trial_dir: Path) -> None:
    """A finished trial never trains again: drop the optimizer state of its training
    checkpoints (DeepSpeed's ds/ folders), keep its final model and metrics. A 50M proxy's
    Adam state is ~0.6 GB; 32 of them would fill a laptop disk."""
    for ds in Path(trial_dir).glob("checkpoints/*/step_*/ds"):
        shutil.rmtree(ds, ignore_errors=True)
