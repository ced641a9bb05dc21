"""The training loop every Ray Train worker runs (`train_loop_per_worker`).

One optimizer step = `grad_accum` micro-batches of this worker's slice of the global
batch (data.py), forward + backward through the DeepSpeed engine, then the ZeRO step.
After each step: per-step hooks, metrics to wandb/metrics.jsonl/console, and (every
`checkpoint_every` steps, at the end, or when a hook asks) a checkpoint through
`ray.train.report` (storage.py: where the storage path is a directory, the workers write
the checkpoint straight into the run's directory there, under a temporary name renamed
when complete, and Ray only registers it; with a bucket (s3://, gs://) each worker
writes to the node's temp dir and Ray uploads it). The checkpoint to resume from is
chosen once, by rank 0, for every worker (storage.py). Metrics alone go to Ray at most
every RAY_REPORT_EVERY_S: a report waits until Ray Train's controller has taken the
previous one, and it polls every 2 s (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S), so a report
per step held 1 s steps to 2 s.

Bad steps: each micro-batch's loss is averaged over the workers before its backward; if
it is not finite, or a spike (> spike_factor x the running mean of good losses), the
backward is poisoned with NaN, and DeepSpeed's overflow check (`check_grad_overflow`)
discards the whole step on every worker: no weight, moment or step-count change. The
batch is consumed (not retried), as in PaLM (Chowdhery et al. 2022, sec. 5.1). After
`max_bad_steps` in a row the run checkpoints and stops with a message.
"""
from __future__ import annotations

import faulthandler
import logging
import math
import os
import shutil
import signal
import socket
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from mamba_slm.platform.fault.worker import WorkerFaultTolerance

from .checkpoint import (check_resumable, load_checkpoint, optimizer_changes, read_train_state, save_checkpoint,
                         save_final_model)
from .data import Batch, PackedSampleReader, StepBatches
from .metrics import MetricsLogger, memory_gb, peak_flops_per_device, plot_loss_curve
from .profiling import StepProfiler
from .schedule import lr_at
from .state import JobSpec, TrainState
from .storage import find_resume_checkpoint, save_and_report
from .validation import Validator, validation_due


log = logging.getLogger(__name__)
RAY_REPORT_EVERY_S = float(os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", 2.0)) + 0.5


@dataclass
class StepResult:
    loss: float
    lr: float
    grad_norm: float | None
    applied: bool
    skip_reason: str


def train_loop_per_worker(config: dict[str, Any]) -> dict[str, Any]:
    """Entry point of every worker; `config` is `{"job": JobSpec.to_dict(), "hooks": [...],
    "local_mode": bool, "run_dir": str}` from `launcher.run_pretraining`."""
    # Ray logs every report at INFO; the step lines below say the same, once. Ray 2.60's
    # Train V2 names that logger by its file path, not by module.
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    try:
        from ray.train.v2._internal.execution import context as _train_context
        logging.getLogger(_train_context.__file__).setLevel(logging.WARNING)
    except ImportError:  # another Ray version: its report lines stay
        pass
    if not config["local_mode"]:
        # `kill -USR1 <worker pid>` prints every thread's stack to the worker's log (a hang in
        # a collective shows where each rank waits); the driver process keeps its handlers.
        faulthandler.register(signal.SIGUSR1, all_threads=True)
    started = time.monotonic()
    job = JobSpec.from_dict(config["job"], hooks=config.get("hooks"))
    rank, world = setup_distributed(job.run.use_gpu, config["local_mode"])
    tcfg = job.training
    reader = PackedSampleReader(job.data.path, job.data.split, tcfg.seed, job.data.shuffle_window_blocks)
    with ExitStack() as stack:
        resume_dir = find_resume_checkpoint(config, stack, job.run.resume_from)  # rank 0 decides for all
        if resume_dir is not None:
            saved = read_train_state(resume_dir)[1]
            check_resumable(saved, job.model, tcfg, str(resume_dir))
            if rank == 0 and (changes := optimizer_changes(saved, tcfg)):
                log.warning("resuming %s with other optimizer settings than it was trained with (%s): "
                            "this run's settings apply from here on", resume_dir.name, changes)
        from .engine import build_engine, resolve_precision

        building = time.monotonic()
        engine, _ = build_engine(job.model, tcfg, world, job.run.use_gpu)
        loading = time.monotonic()
        state = (load_checkpoint(engine, resume_dir, rank, world, node_position())
                 if resume_dir is not None else TrainState())
        # where a (re)start's time went, in this group's first metrics record: after a
        # failure, restarting costs this plus the steps redone since the checkpoint
        startup = {"engine_build_s": loading - building,
                   "checkpoint_load_s": time.monotonic() - loading if resume_dir is not None else None}
        ft = WorkerFaultTolerance(tcfg, job.run, rank, world, resume_dir)  # reads the ledger
    logger = None
    if rank == 0:
        logger = MetricsLogger(Path(job.run.output_dir), job.to_dict(), job.run.name, tcfg.max_steps,
                               job.run.wandb, job.run.wandb_project, job.run.log_every)
        load = "" if startup["checkpoint_load_s"] is None else f", checkpoint load {startup['checkpoint_load_s']:.1f} s"
        logger.message(describe_start(job, engine, world, state) + f"; ready after {time.monotonic() - started:.1f} s "
                       f"(engine build {startup['engine_build_s']:.1f} s{load})")
        ft.message = logger.message
    batches = StepBatches(reader, tcfg.global_batch_size, tcfg.micro_batch_size, rank, world)
    validator = Validator(job.data.path, tcfg, rank, world) if tcfg.eval_every else None
    peak = peak_flops_per_device(job.run.use_gpu, resolve_precision(tcfg, job.run.use_gpu))
    flops_per_token = meta_model(job).flops_per_token(reader.seq_len)
    last_report = time.monotonic()
    profiler = StepProfiler(job.run.profile_steps if rank == 0 else "", Path(job.run.output_dir) / "profile",
                            job.run.use_gpu, logger.message if logger else print)
    try:
        while state.step < tcfg.max_steps and not state.stop_reason:
            profiler.before(state.step + 1)
            t0 = time.perf_counter()
            micro_batches = batches.get(state.sample_position)
            result = train_step(engine, micro_batches, state, tcfg)
            if job.run.use_gpu:
                torch.cuda.synchronize()
            elapsed = time.perf_counter() - t0
            profiler.after(state.step + 1, elapsed)
            advance(state, result, tcfg, reader.seq_len)
            ft.record(micro_batches)
            for hook in job.hooks:
                hook.on_step_end(state, rank)
            # collective: all workers agree on stopping and on reporting to Ray
            agreed = ft.after_step(state, elapsed, report_wanted=rank == 0 and time.monotonic()
                                   - last_report >= RAY_REPORT_EVERY_S)
            metrics = step_metrics(state, result, elapsed, tcfg.tokens_per_step(reader.seq_len),
                                   flops_per_token, peak, world)
            # collective, on the same steps everywhere (agreed.stop is every worker's answer;
            # a stop for bad steps follows the global loss and overflow checks)
            stopping_early = (agreed.stop or bool(state.stop_reason)) and state.step < tcfg.max_steps
            if validator is not None and validation_due(state.step, tcfg, stopping_early):
                metrics.update(validator.evaluate(engine, interrupted=lambda: bool(ft.watcher.check())) or {})
            metrics["preempted"] = ft.preempted
            if startup:  # the first step of this worker group: from entry to its end
                metrics.update(startup, startup_s=time.monotonic() - started)
                startup = {}
            if logger is not None:
                logger.log(metrics)
            if report(engine, job, config, state, metrics, rank, logger, ft, agreed.report):
                last_report = time.monotonic()
            if agreed.stop:
                break
    finally:
        profiler.close()
        ft.close()
        batches.close()
        if logger is not None:
            finish(logger, job, state)
    return {"step": state.step, "stop_reason": state.stop_reason, "preempted": ft.preempted}


def meta_model(job: JobSpec):
    """The network on the meta device: true sizes even when ZeRO-3 partitions the real one."""
    from mamba_slm.model import HybridLM

    with torch.device("meta"):
        return HybridLM(job.model)


def setup_distributed(use_gpu: bool, local_mode: bool) -> tuple[int, int]:
    """Rank and world size; the process group is Ray Train's (gloo or NCCL). In local
    mode (num_workers=0, tests) this process forms a group of one for DeepSpeed."""
    import ray.train

    # Before DeepSpeed picks an accelerator; also where the worker's environment says
    # otherwise (a cluster, or a test session, started with DS_ACCELERATOR=cpu).
    os.environ["DS_ACCELERATOR"] = "cuda" if use_gpu else "cpu"
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    local_rank = ctx.get_local_rank()
    if use_gpu:
        from ray.train.torch import get_device

        device = torch.device("cuda", local_rank) if local_mode else get_device()
        torch.cuda.set_device(device)
        local_rank = device.index  # DeepSpeed selects its device by LOCAL_RANK
    # DeepSpeed reads these even when the process group already exists.
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(local_rank))
    if local_mode and not dist.is_initialized():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        dist.init_process_group("nccl" if use_gpu else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                                rank=0, world_size=1)
        forget_deepspeed_groups()
    return rank, world


def node_position() -> tuple[int, int]:
    """(node rank, local rank) of this worker in Ray Train's worker group."""
    import ray.train

    ctx = ray.train.get_context()
    return ctx.get_node_rank(), ctx.get_local_rank()


def forget_deepspeed_groups() -> None:
    """DeepSpeed caches sub-groups of the process group in module globals. Ray's local
    mode destroys the group after each run, so a second in-process run (tests) must not
    reuse groups of the dead one."""
    from deepspeed.utils import groups

    for name, value in list(vars(groups).items()):
        if name.startswith("_") and name.isupper() and ("GROUP" in name):
            setattr(groups, name, {} if isinstance(value, dict) else None)


def train_step(engine, micro_batches: list[Batch], state: TrainState, cfg) -> StepResult:
    lr = lr_at(state.step, cfg)
    for group in engine.optimizer.param_groups:
        group["lr"] = lr
    threshold = loss_threshold(state, cfg)
    checks, bad = [], None
    for mb in micro_batches:
        dev = engine.device
        # The chunked loss (return_logits=False) never holds the full (b, L, V) fp32 logits;
        # it runs inside lm_head's forward, where ZeRO-3 has gathered the head's weight.
        out = engine(mb.input_ids.to(dev), seq_idx=mb.seq_idx.to(dev), labels=mb.labels.to(dev),
                     return_logits=False)
        global_loss = mean_over_workers(out.loss.detach())
        # Decided on the device, so that the host queues the backward while the forward
        # still runs: reading the loss here waited for the forward on every micro-batch and
        # left the GPU idle while the backward was launched. Once a micro-batch is bad, the
        # rest of the step is poisoned too; DeepSpeed drops a step whose gradients are not
        # finite.
        this_bad = ~torch.isfinite(global_loss) | (global_loss > threshold)
        bad = this_bad if bad is None else bad | this_bad
        engine.backward(out.loss * torch.where(bad, float("nan"), 1.0))
        engine.step()
        checks.append(torch.stack([global_loss, this_bad.float()]))
    values = torch.stack(checks).tolist()  # the one read, after the step (which syncs anyway)
    losses = [v for v, _ in values]
    skip_reason = next((bad_loss_reason(v, state, cfg) for v, was_bad in values if was_bad), "")
    grad_norm = engine.get_global_grad_norm()
    applied = engine.was_step_applied()
    if not applied and not skip_reason:
        skip_reason = "non-finite gradients"
    return StepResult(loss=sum(losses) / len(losses), lr=lr, applied=applied, skip_reason=skip_reason,
                      grad_norm=None if grad_norm is None or not applied else float(grad_norm))


def mean_over_workers(x: torch.Tensor) -> torch.Tensor:
    """The mean of a scalar over the workers, as a float32 tensor on x's device."""
    x = x.float().clone()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
        x /= dist.get_world_size()
    return x


def loss_threshold(state: TrainState, cfg) -> float:
    """The loss above which a step counts as a spike (inf while the test is off): spike_factor
    x the running mean of good losses, after spike_warmup_steps."""
    if cfg.spike_factor and state.loss_ema is not None and state.step >= cfg.spike_warmup_steps:
        return cfg.spike_factor * state.loss_ema
    return math.inf


def bad_loss_reason(loss: float, state: TrainState, cfg) -> str:
    """Why a loss the device found bad (not finite, or over `loss_threshold`) skips its step."""
    if not math.isfinite(loss):
        return "non-finite loss"
    return f"loss spike {loss:.3f} > {cfg.spike_factor:g} x running mean {state.loss_ema:.3f}"


def advance(state: TrainState, result: StepResult, cfg, seq_len: int) -> None:
    state.step += 1
    state.sample_position += cfg.global_batch_size
    state.tokens_seen += cfg.tokens_per_step(seq_len)
    if result.applied:
        state.bad_in_a_row = 0
        state.loss_ema = result.loss if state.loss_ema is None else 0.9 * state.loss_ema + 0.1 * result.loss
        return
    state.skipped_steps += 1
    state.bad_in_a_row += 1
    if state.bad_in_a_row >= cfg.max_bad_steps:
        state.stop_reason = (f"{state.bad_in_a_row} bad steps in a row (last: {result.skip_reason}) at "
                             f"step {state.step}: stopped with a checkpoint. Lower --lr, raise "
                             "--warmup-steps or check the data, then resume.")


def step_metrics(state: TrainState, r: StepResult, elapsed: float, tokens_per_step: int,
                 flops_per_token: float, peak: float | None, world: int) -> dict[str, Any]:
    tokens_per_s = tokens_per_step / elapsed
    return {"step": state.step, "loss": r.loss, "lr": r.lr, "grad_norm": r.grad_norm,
            "tokens_per_s": tokens_per_s, "tokens_per_s_per_worker": tokens_per_s / world, "workers": world,
            "mfu": None if peak is None else flops_per_token * tokens_per_s / (peak * world),
            "step_time_s": elapsed, "tokens_seen": state.tokens_seen,
            "sample_position": state.sample_position, "skipped": not r.applied,
            "skip_reason": r.skip_reason, "skipped_steps": state.skipped_steps,
            "stop_reason": state.stop_reason, "resumed_from_step": state.resumed_from_step,
            "time": time.time(), **memory_gb()}


def report(engine, job: JobSpec, config: dict[str, Any], state: TrainState, metrics: dict[str, Any],
           rank: int, logger: MetricsLogger | None, ft: WorkerFaultTolerance, report_due: bool) -> bool:
    """-> whether this step reported to Ray. Every worker decides alike (Ray requires the
    same number of calls): at checkpoint steps, at the end, and when `report_due` (agreed
    by all workers). A checkpoint is sealed (ledger + checksums, platform/fault) before it
    is published (storage.save_and_report: where and under which name)."""
    import ray.train

    cfg = job.training
    end = state.step >= cfg.max_steps or bool(state.stop_reason) or state.stop_requested
    if state.stop_requested and not state.stop_reason:
        state.stop_reason = "stop requested by a hook"
    # --no-save-final: a throughput run ends without writing anything
    final = end and (job.run.save_final or bool(state.stop_reason))
    save = final or state.checkpoint_requested or ft.checkpoint_due(state.step)
    if not save:
        if end or report_due:
            ray.train.report(metrics)
        return end or report_due
    state.checkpoint_requested = False

    def write(path: Path) -> None:  # collective: this worker's files, sealed
        save_checkpoint(engine, state, job.to_dict(), path, rank)
        if final:
            write_final_outputs(engine, job, state, path, rank, logger)
        ft.seal(path, state)

    save_and_report(config, state.step, rank, job.run.keep_checkpoints, metrics, write,
                    written=lambda seconds: ft.checkpoint_written(state.step, seconds))
    return True


def write_final_outputs(engine, job: JobSpec, state: TrainState, ckpt_path: Path, rank: int,
                        logger: MetricsLogger | None) -> None:
    """The model as safetensors + config + tokenizer, in the output dir and in the final
    checkpoint (so it reaches the storage path, e.g. a bucket), with the loss curve."""
    out = Path(job.run.output_dir)
    tokenizer = Path(job.data.path) / "tokenizer.json"
    from .data import read_manifest

    meta = {"training": job.training.to_dict(), "step": state.step, "tokens_seen": state.tokens_seen,
            "data": job.data.path, "eos_id": read_manifest(job.data.path).get("eos_id")}
    save_final_model(engine, job.model, out / "model", str(tokenizer) if tokenizer.is_file() else None,
                     meta, rank)
    if rank != 0:
        return
    shutil.copytree(out / "model", ckpt_path / "model", dirs_exist_ok=True)
    if job.run.plot and plot_loss_curve(out) is not None:
        shutil.copy(out / "loss_curve.png", ckpt_path / "loss_curve.png")
    shutil.copy(out / "metrics.jsonl", ckpt_path / "metrics.jsonl")


def describe_start(job: JobSpec, engine, world: int, state: TrainState) -> str:
    t, m = job.training, job.model
    where = (f"resuming at step {state.step} (sample {state.sample_position})"
             if state.resumed_from_step is not None else "starting from scratch")
    if state.step >= t.max_steps:
        where = (f"already finished at step {state.step}: nothing to do (raise --max-steps to "
                 "continue, or pick a new --name)")
    return (f"[bold]{job.run.name}[/bold]: {m.name} ({meta_model(job).num_parameters() / 1e6:.1f}M params, "
            f"layers {m.layer_pattern}), {world} worker(s), ZeRO-{t.zero_stage}, "
            f"global batch {t.global_batch_size} = {t.micro_batch_size} x {t.grad_accum_steps(world)} "
            f"accum x {world}, {t.max_steps} steps, {where}")


def finish(logger: MetricsLogger, job: JobSpec, state: TrainState) -> None:
    if state.stop_reason:
        logger.message(f"[red]{state.stop_reason}[/red]")
    logger.close()
