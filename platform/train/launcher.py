"""Driver side of a pretraining run: resolve data, model and paths, start (or join) Ray,
run the `TorchTrainer`, summarise the result.

Paths are made absolute here, because Ray Train workers run in their own directories.
Layout of a run with the default local storage (`./runs`):

    runs/<name>/                 output dir = Ray's run directory
        step_00000050/ ...       checkpoints (train_state.json, rng, ds/), newest kept
        model/                   final model (save_pretrained: config.json, safetensors, tokenizer)
        metrics.jsonl  loss_curve.png  wandb/
"""
from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mamba_slm.model import ModelConfig
from mamba_slm.platform.extras import missing_extra

from .config import DataConfig, RunConfig, TrainingConfig, check_run_fits
from .data import read_manifest
from .loop import train_loop_per_worker
from .metrics import read_metrics
from .state import JobSpec

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    run_dir: str
    output_dir: str
    checkpoint: str | None
    metrics: list[dict[str, Any]]  # per step, from metrics.jsonl (rank 0's disk)
    last: dict[str, Any]
    stop_reason: str


def is_uri(path: str) -> bool:
    return "://" in path


def holds_checkpoint(path: Path) -> bool:
    """A checkpoint directory, or one holding checkpoints (by listing; rank 0 verifies
    their checksums when it resumes)."""
    from mamba_slm.platform.fault.integrity import checkpoints_newest_first

    from .checkpoint import STATE_FILE

    return (path / STATE_FILE).is_file() or any((c / STATE_FILE).is_file() for c in checkpoints_newest_first(path))


def check_validation_split(data_path: str, training: TrainingConfig) -> None:
    """--eval-every needs a val split of at least one global batch (ValueError otherwise)."""
    from .data import PackedSampleReader
    from .validation import SPLIT, validation_batches

    try:
        reader = PackedSampleReader(data_path, SPLIT, training.seed)
    except ValueError as exc:
        raise ValueError(f"--eval-every {training.eval_every}: {exc}; curate the data with a "
                         f"validation split, or turn the evaluation off (--eval-every 0)") from exc
    validation_batches(reader, training.global_batch_size, training.eval_batches)


def resolve_job(training: TrainingConfig, data: DataConfig, run: RunConfig,
                model_overrides: dict[str, Any] | None = None, hooks: list | None = None) -> JobSpec:
    """Fill in what the flags left open: the data (demo corpus when no path), the model
    (vocabulary and context from the manifest), the run name and absolute paths."""
    check_run_fits(training, run)  # before anything starts (JobSpec checks it again)
    if run.num_workers == 0 and is_uri(run.storage_path):
        raise ValueError(f"--num-workers 0 trains in this process, without Ray Train's storage "
                         f"layer, so checkpoints cannot go to {run.storage_path}; give a directory "
                         "(--storage-path /path) or run with --num-workers 1 or more")
    if training.float8 and (msg := missing_extra("float8", what="--float8")):
        raise ValueError(msg)
    if training.float8 and not run.use_gpu:
        raise ValueError("--float8 needs --use-gpu (float8 matmuls: H100, H200, L4-class GPUs)")
    if not data.path:
        from mamba_slm.platform.data import ensure_demo_data

        ensure_ray(run.use_gpu)  # ours first: it forwards the workers' output to this console
        data = dataclasses.replace(data, path=str(ensure_demo_data()))
    if not is_uri(data.path):
        data = dataclasses.replace(data, path=str(Path(data.path).resolve()))
    manifest = read_manifest(data.path)
    seq_len = int(manifest["seq_len"])
    if training.eval_every:
        check_validation_split(data.path, training)
    overrides = {"vocab_size": int(manifest["vocab_size"]), **(model_overrides or {})}
    base = ModelConfig.from_name(training.model_size)
    if seq_len > base.max_seq_len:
        overrides.setdefault("max_seq_len", seq_len)
    model = ModelConfig.from_name(training.model_size, **overrides)
    name = run.name or f"{training.name}-{training.model_size}"
    output = Path(run.output_dir or Path("runs") / name).resolve()
    storage = run.storage_path or str(output.parent)
    if storage.startswith("file://"):  # a directory spelled as a URI: resume scans it as one
        storage = storage[len("file://"):]
    if not is_uri(storage):
        storage = str(Path(storage).resolve())
    if run.storage_path == "" and output.name != name:
        storage = str(output / "checkpoints")  # a custom --output-dir keeps its checkpoints inside
    if run.resume_from and not holds_checkpoint(Path(run.resume_from)):
        raise ValueError(f"--resume-from {run.resume_from}: no checkpoint there (give a checkpoint, "
                         "step_NNNNNNNN/, or a run directory holding them, on a path this machine and "
                         "the workers can read)")
    run = dataclasses.replace(run, name=name, output_dir=str(output), storage_path=storage,
                              resume_from=str(Path(run.resume_from).resolve()) if run.resume_from else "")
    if seq_len != training.seq_len:
        log.warning("--seq-len %d: the data in %s is curated at seq_len %d, which this run trains at "
                    "(the data decides)", training.seq_len, data.path, seq_len)
        training = dataclasses.replace(training, seq_len=seq_len)
    warn_if_all_warmup(training)
    if training.float8 and (training.micro_batch_size * seq_len) % 16:
        # the weight gradient's float8 matmul multiplies over the micro-batch's tokens
        raise ValueError(f"--float8 needs micro_batch_size x seq_len = {training.micro_batch_size} x "
                         f"{seq_len} to be a multiple of 16 (cuBLAS's float8 matmul); change "
                         "--micro-batch-size or the data's seq_len")
    job = JobSpec(training, data, run, model, hooks or [])
    if not is_uri(storage):
        check_resume_compatible(job)
    return job


def warn_if_all_warmup(training: TrainingConfig) -> None:
    """A warmup as long as the schedule (a few-step smoke run keeping a preset's warmup) is
    allowed, but the learning rate then never reaches its peak nor decays: say so."""
    horizon = training.schedule_steps or training.max_steps
    if training.warmup_steps >= horizon:
        log.warning("--warmup-steps %d >= the %d steps of the schedule: the learning rate only ramps up, to "
                    "%.3g of --lr at the last step, and never decays (lower --warmup-steps for a real run)",
                    training.warmup_steps, horizon, horizon / training.warmup_steps)


def resume_config(run: RunConfig) -> tuple[Path, dict[str, Any]] | None:
    """(checkpoint, its stored config) that a run with local storage would resume from: its
    own newest checkpoint, else --resume-from's, by listing (the workers verify checksums
    when they resume; the architecture and ZeRO stage are those of every checkpoint of a run,
    as the workers refuse others). None: a fresh start."""
    from mamba_slm.platform.fault.integrity import checkpoints_newest_first

    from .checkpoint import STATE_FILE, read_train_state

    candidates = checkpoints_newest_first(Path(run.storage_path) / run.name)
    if not candidates and run.resume_from:
        given = Path(run.resume_from)
        candidates = [given] if (given / STATE_FILE).is_file() else checkpoints_newest_first(given)
    for ckpt in candidates:
        try:
            return ckpt, read_train_state(ckpt)[1]
        except (OSError, ValueError, KeyError, TypeError):  # missing or damaged: the workers skip it too
            continue
    return None


def check_resume_compatible(job: JobSpec) -> None:
    """Refuse, before any worker starts, to resume a checkpoint of another architecture or
    ZeRO stage (the workers check too, but each of their refusals costs a restart of the
    worker group, up to --max-failures of them)."""
    from .checkpoint import check_resumable

    found = resume_config(job.run)
    if found is not None:
        ckpt, config = found
        check_resumable(config, job.model, job.training, str(ckpt))


def ensure_ray(use_gpu: bool, include_dashboard: bool = False, log_to_driver: bool = True) -> None:
    """Join the cluster in RAY_ADDRESS (a `ray job submit` sets it), else start a local one.
    Tune sweeps ask for the dashboard: trials that start Ray Train worker groups hang
    without it (FIELD-NOTES)."""
    import ray

    if ray.is_initialized():
        return
    env = {"RAY_USAGE_STATS_ENABLED": "0", "TOKENIZERS_PARALLELISM": "false"}
    if not use_gpu:
        env["DS_ACCELERATOR"] = "cpu"
    os.environ.update(env)
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], logging_level="ERROR", log_to_driver=log_to_driver)
    else:
        # A laptop/CI machine: at least 4 logical CPUs so 2 workers plus Ray's own tasks
        # fit on a 2-core machine (FIELD-NOTES).
        ray.init(address="local", num_cpus=max(4, os.cpu_count() or 1), logging_level="ERROR",
                 runtime_env={"env_vars": env}, include_dashboard=include_dashboard,
                 log_to_driver=log_to_driver)


def run_pretraining(job: JobSpec) -> TrainResult:
    import ray.train
    from ray.train.torch import TorchConfig

    from .raytrainer import Trainer

    run = job.run
    local_mode = run.num_workers == 0
    if not local_mode:  # local mode runs the loop in this process, no cluster needed
        ensure_ray(run.use_gpu)
    workers = (run.min_workers, run.num_workers) if run.min_workers else run.num_workers
    def make_trainer() -> Trainer:  # a fresh trainer per submission (fit_with_resubmission)
        return Trainer(
            train_loop_per_worker,
            train_loop_config={"job": job.to_dict(), "hooks": job.hooks, "local_mode": local_mode,
                               "run_dir": str(Path(run.storage_path) / run.name)},
            torch_config=TorchConfig(backend="nccl" if run.use_gpu else "gloo"),
            scaling_config=ray.train.ScalingConfig(
                num_workers=workers, use_gpu=run.use_gpu, resources_per_worker={"CPU": run.cpus_per_worker},
                **({"elastic_resize_monitor_interval_s": run.resize_every_s} if run.min_workers else {})),
            run_config=ray.train.RunConfig(
                name=run.name, storage_path=run.storage_path,
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=run.keep_checkpoints),
                failure_config=ray.train.FailureConfig(max_failures=run.max_failures),
                logging_config=ray.train.LoggingConfig(log_level="WARNING")),
        )
    result = fit_with_resubmission(make_trainer, run.max_failures)
    metrics = read_metrics(Path(run.output_dir))
    last = result.metrics or (metrics[-1] if metrics else {})
    return TrainResult(run_dir=str(Path(run.storage_path) / run.name), output_dir=run.output_dir,
                       checkpoint=result.checkpoint.path if result.checkpoint else None,
                       metrics=metrics, last=last, stop_reason=last.get("stop_reason", ""))


def fit_with_resubmission(make_trainer, max_failures: int):
    """`trainer.fit()`, resubmitted when Ray Train's controller itself fails.

    Ray 2.60 retries worker failures within `FailureConfig(max_failures)`, but when a
    killed worker takes its peers down while the controller replaces it, the controller
    can fail with `ActorUnavailableError`, a non-retryable `ControllerError` (seen in
    the chaos runs of platform/fault). A resubmission of the same run resumes from its
    latest checkpoint, exactly as after a worker restart. At most `max_failures`
    resubmissions, each with its own budget of `max_failures` worker restarts (Ray does not
    report how many a failed fit used), so a run stops after at most (max_failures + 1)^2
    worker-group starts."""
    from ray.train import ControllerError

    for attempt in range(max_failures + 1):
        try:
            return make_trainer().fit()
        except ControllerError as err:
            if attempt == max_failures:
                raise
            print(f"Ray Train's controller failed ({type(err.controller_failure).__name__}); "
                  f"resubmitting the run ({attempt + 1}/{max_failures}), it resumes from its latest checkpoint")


def summarize(job: JobSpec, result: TrainResult) -> str:
    """The lines printed when the job ends."""
    m = result.metrics
    lines = [f"run {job.run.name}: {len(m)} steps logged in {result.output_dir}"]
    if m:
        steady = [r["tokens_per_s"] for r in m[1:]] or [m[0]["tokens_per_s"]]
        lines.append(f"  loss {m[0]['loss']:.4f} (step {m[0]['step']}) -> {m[-1]['loss']:.4f} "
                     f"(step {m[-1]['step']}); {sum(steady) / len(steady):,.0f} tokens/s; "
                     f"skipped steps {m[-1].get('skipped_steps', 0)}")
        val = [r for r in m if "val_loss" in r]
        if val:
            lines.append(f"  val loss {val[0]['val_loss']:.4f} (step {val[0]['step']}) -> {val[-1]['val_loss']:.4f} "
                         f"(step {val[-1]['step']}), perplexity {val[-1]['val_ppl']:.2f}")
    model_dir = Path(result.output_dir) / "model"
    if model_dir.is_dir():
        lines.append(f"  final model:     {model_dir}")
    if (Path(result.output_dir) / "loss_curve.png").is_file():
        lines.append(f"  loss curve:      {Path(result.output_dir) / 'loss_curve.png'}")
    lines.append(f"  last checkpoint: {result.checkpoint}")
    if result.stop_reason:
        lines.append(f"  STOPPED: {result.stop_reason}")
    return "\n".join(lines)
