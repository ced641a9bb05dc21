"""Training checkpoints: the one module that writes and reads them.

A checkpoint directory (one per saved step, `step_00000050/` under the run's storage
path, `step_00000050-r1/` for the same step saved again after a fallback, see
platform/fault/integrity.py; every worker writes its own files into it, see
`write_in_place`, or with a bucket Ray Train uploads and merges them):

    train_state.json          step, sample position, counters, the full JobSpec config
    rng_rank{r}.pt            python / numpy / torch RNG state of worker r
    ds/                       DeepSpeed: weights, ZeRO-partitioned optimizer state
                              (engine.save_checkpoint, tag "ds"); zero_to_fp32 reads it
                              and so does ds_to_universal (resume on another world size)
    model/                    (final checkpoint only) save_pretrained directory

`load_model(path)` opens either kind of directory (a `save_pretrained` model, a
checkpoint, or a run directory holding checkpoints) as a `HybridLM` on the CPU.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import logging
import random
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from mamba_slm.model import HybridLM, ModelConfig
from mamba_slm.model.io import CONFIG_FILE, WEIGHTS_FILE, load_pretrained, save_pretrained
from mamba_slm.platform.fault.integrity import fresh_temporary_dir, move_files, publish_atomically
from mamba_slm.platform.fault.worker import broadcast_from_rank0

from .config import TrainingConfig
from .state import TrainState

log = logging.getLogger(__name__)
STATE_FILE, DS_TAG = "train_state.json", "ds"


class ArchitectureMismatchError(ValueError):
    pass


def save_checkpoint(engine, state: TrainState, config: dict[str, Any], path: Path, rank: int) -> None:
    """Collective: every worker calls it with its own local `path`."""
    path.mkdir(parents=True, exist_ok=True)
    engine.save_checkpoint(str(path), tag=DS_TAG)
    torch.save({"python": random.getstate(), "numpy": np.random.get_state(),
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None},
               path / f"rng_rank{rank}.pt")
    if rank == 0:
        (path / STATE_FILE).write_text(json.dumps({"state": state.to_dict(), "config": config}, indent=2))


def read_train_state(path: str | Path) -> tuple[TrainState, dict[str, Any]]:
    d = json.loads((Path(path) / STATE_FILE).read_text())
    return TrainState.from_dict(d["state"]), d["config"]


def check_architecture(saved: dict[str, Any], current: ModelConfig, where: str) -> None:
    """Refuse to resume weights into a different network (nanoGPT keeps `model_args`
    for the same reason); implementation switches (ssm_path, attn_impl) may differ."""
    ignore = {"ssm_path", "attn_impl", "name", "extra"}
    now = current.to_dict()
    diff = {k: (saved.get(k), now.get(k)) for k in sorted(set(saved) | set(now))
            if k not in ignore and saved.get(k) != now.get(k)}
    if diff:
        lines = ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in diff.items())
        raise ArchitectureMismatchError(
            f"cannot resume from {where}: it holds a different architecture ({lines}). Use the "
            "same --size and data (vocabulary), or start a new run with another --name.")


def check_resumable(saved: dict[str, Any], model: ModelConfig, training: TrainingConfig, where: str) -> None:
    """Refuse a checkpoint (its stored config `saved`) this run cannot continue: another
    architecture, or another ZeRO stage (DeepSpeed's files differ by stage, and loading one
    with the other fails as "no checkpoint")."""
    check_architecture(saved["model"], model, where)
    stage = saved.get("training", {}).get("zero_stage")
    if stage is not None and stage != training.zero_stage:
        raise ValueError(
            f"cannot resume from {where}: it was written with --zero-stage {stage}, this run asks for "
            f"--zero-stage {training.zero_stage} (DeepSpeed keeps the two stages' weights and optimizer "
            f"state in different files). Resume with --zero-stage {stage}, or start a new run with another --name.")


# TrainingConfig fields a resumed run takes from its own flags, not from the checkpoint
OPTIMIZER_FIELDS = ("lr", "weight_decay", "beta1", "beta2", "adam_eps", "grad_clip")


def optimizer_changes(saved: dict[str, Any], training: TrainingConfig) -> str:
    """'field: checkpoint X -> now Y, ...' for the optimizer settings of `training` that
    differ from those the checkpoint (its stored config `saved`) was trained with; '' if none."""
    before = saved.get("training", {})
    return ", ".join(f"{name}: checkpoint {before[name]!r} -> now {getattr(training, name)!r}"
                     for name in OPTIMIZER_FIELDS if name in before and before[name] != getattr(training, name))


def optimizer_settings(engine) -> tuple[list[dict[str, Any]], float]:
    """The engine's optimizer settings, as built from this run's config: every param group's
    hyperparameters ("params" and a group-held "step" counter left out) and the gradient clip."""
    groups = [{k: copy.deepcopy(v) for k, v in group.items() if k not in ("params", "step")}
              for group in engine.optimizer.param_groups]
    return groups, engine.gradient_clipping()


def restore_optimizer_settings(engine, settings: tuple[list[dict[str, Any]], float]) -> None:
    """Put back what `optimizer_settings` took before `engine.load_checkpoint` overwrote it.

    DeepSpeed 0.19.8 loads the saved settings with the optimizer state: torch's
    `Optimizer.load_state_dict` replaces every group's hyperparameters, ZeRO-1/2 also its
    gradient clip (`_load_global_state`), and ZeRO-3's universal-checkpoint loader
    (`load_hp_checkpoint_state_from_checkpoint_dir_stage3`) copies the *first* group's
    settings into every group, which gave the no-decay group (norms, biases, A_log, D,
    dt_bias) weight decay after every elastic resize. A resumed run follows its own flags."""
    groups, clip = settings
    if len(groups) != len(engine.optimizer.param_groups):
        raise RuntimeError(f"the optimizer has {len(engine.optimizer.param_groups)} parameter groups after "
                           f"loading a checkpoint, {len(groups)} before")
    for group, before in zip(engine.optimizer.param_groups, groups):
        group.update(copy.deepcopy(before))
    engine._config.gradient_clipping = clip  # the engine's own clipping (non-ZeRO paths) reads this
    if hasattr(engine.optimizer, "clip_grad"):  # ZeRO-1/2 and ZeRO-3 clip with this
        engine.optimizer.clip_grad = clip


def saved_world_size(path: str | Path) -> int:
    """Data-parallel ranks the checkpoint was written by (one ZeRO optimizer shard each)."""
    return len(list((Path(path) / DS_TAG).glob("*_optim_states.pt")))


def to_universal(path: Path, out: Path) -> Path:
    """Convert the ZeRO-partitioned `ds/` of a checkpoint into DeepSpeed's universal
    format (one fp32 weight + Adam moments per parameter, no partitioning) under `out`.
    The checkpoint itself is left untouched."""
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    args = argparse.Namespace(input_folder=str(path / DS_TAG), output_folder=str(out / DS_TAG),
                              num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False,
                              strict=True, inject_missing_state=True)
    t0, chatter = time.perf_counter(), io.StringIO()
    try:
        with contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter):
            ds_to_universal(args)
    except Exception:
        log.error("ds_to_universal failed on %s:\n%s", path, chatter.getvalue()[-3000:])
        raise
    log.warning("converted %s to a universal checkpoint in %.1f s", path.name, time.perf_counter() - t0)
    return out


def load_checkpoint(engine, path: Path, rank: int, world: int = 0, node: tuple[int, int] = (0, 0)) -> TrainState:
    """Collective: restore the engine (weights + optimizer) and this worker's RNG.

    A checkpoint written by a different number of workers (an elastic run that lost or
    regained nodes) cannot be loaded shard for shard: ZeRO partitions the optimizer state
    by world size. It is converted to DeepSpeed's universal checkpoint once per node (local
    rank 0, into a scratch directory), and every worker loads its new partition from that;
    the Adam moments and fp32 master weights carry over exactly. `node` is (node rank,
    local rank) of this worker. The optimizer's settings (weight decay, betas, eps, gradient
    clip) stay those the engine was built with, this run's (`restore_optimizer_settings`)."""
    saved = saved_world_size(path)
    universal = bool(world and saved and saved != world)
    node_rank, local_rank = node
    load_dir = _universal_copy(path, saved, world, node_rank, local_rank) if universal else path
    engine._config.load_universal_checkpoint = universal  # read by load_checkpoint at call time
    settings = optimizer_settings(engine)
    try:
        load_path, _ = engine.load_checkpoint(str(load_dir), tag=DS_TAG, load_optimizer_states=True,
                                              load_lr_scheduler_states=False)
        restore_optimizer_settings(engine, settings)
    finally:
        if universal:
            engine._config.load_universal_checkpoint = False
            barrier()
            if local_rank == 0:
                shutil.rmtree(load_dir, ignore_errors=True)
    if load_path is None:
        raise RuntimeError(f"DeepSpeed found no checkpoint under {path}/{DS_TAG}")
    rng_file = path / f"rng_rank{rank}.pt"
    if rng_file.is_file():  # absent when the run resumes on more workers than it saved
        rng = torch.load(rng_file, weights_only=False)
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    state, _ = read_train_state(path)
    state.resumed_from_step = state.step
    if state.stop_reason:  # the user was told to fix the cause and resume: go on
        if rank == 0:
            log.warning("checkpoint %s ended a run that stopped (%s); resuming past it", path.name,
                        state.stop_reason)
        state.stop_reason, state.bad_in_a_row = "", 0
    return state


def _universal_copy(path: Path, saved: int, world: int, node_rank: int, local_rank: int) -> Path:
    """The universal form of `path` in this node's scratch space (collective)."""
    out = (Path(tempfile.gettempdir()) / "mamba-slm-universal"
           / f"{path.parent.name}-{path.name}-w{world}-node{node_rank}")
    if local_rank == 0:
        log.warning("checkpoint %s was written by %d workers, resuming on %d: converting it to a "
                    "DeepSpeed universal checkpoint", path.name, saved, world)
        to_universal(path, out)
    barrier()
    return out


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


def write_in_place(final_dir: Path, rank: int, write: Callable[[Path], None]) -> Path:
    """Collective: a checkpoint written straight into its directory in storage (one every
    worker can reach), published only once complete.

    `final_dir` is a name never published before (storage.new_checkpoint_name). Rank 0
    makes one temporary directory beside it (removing those that writers killed
    mid-save left there) before any rank writes. `write(part)` writes and
    seals this worker's files in its own part of it, so its manifest covers exactly the
    files it wrote (as when each worker writes a local directory for Ray to merge); the
    parts are moved in, and once every rank has done so rank 0 renames the directory into
    place; every rank returns after that. A worker killed on the way leaves only the
    hidden temporary directory (resume never reads it)."""
    tmp = broadcast_from_rank0(fresh_temporary_dir(final_dir) if rank == 0 else None)
    part = tmp / f".rank{rank}"
    write(part)
    move_files(part, tmp)
    barrier()
    if rank == 0:
        publish_atomically(tmp, final_dir)
    barrier()
    return final_dir


def gather_full_state_dict(engine, rank: int) -> dict[str, torch.Tensor]:
    """Collective: full fp32 CPU copies of the module's weights, kept on rank 0 only, one
    parameter at a time (no GPU holds the whole model). They are the optimizer's fp32
    master weights, as in the checkpoint: under bf16 the module's own parameters are
    bf16-rounded copies of them."""
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    module = engine.module
    out = {}
    for name, p in module.named_parameters():
        full = safe_get_full_fp32_param(p)  # collective; None for a parameter the optimizer does not hold
        if full is None:
            with deepspeed.zero.GatheredParameters([p], enabled=hasattr(p, "ds_id")):
                full = p.detach().float().clone() if rank == 0 else None
        if rank == 0:
            out[name] = full.float().cpu()
    if rank == 0:
        out.update({name: b.detach().cpu().clone() for name, b in module.named_buffers()})
    return out


def save_final_model(engine, model_cfg: ModelConfig, path: Path, tokenizer_file: str | None,
                     metadata: dict[str, Any], rank: int) -> None:
    """Collective: write the trained weights as a `save_pretrained` directory (rank 0)."""
    state = gather_full_state_dict(engine, rank)
    if rank != 0:
        return
    with torch.device("meta"):
        model = HybridLM(model_cfg)
    model.load_state_dict(_fill_tied(state, model_cfg), strict=False, assign=True)
    save_pretrained(model, path, tokenizer_file=tokenizer_file, metadata=metadata)


def _fill_tied(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    if cfg.tie_embeddings and "lm_head.weight" not in state:
        state["lm_head.weight"] = state["embed_tokens.weight"]
    return state


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete and intact checkpoint under a run directory: its SHA-256
    manifests verified (platform/fault/integrity.py); a torn or corrupt newer one is
    skipped with a warning."""
    from mamba_slm.platform.fault.integrity import latest_good_checkpoint

    found = latest_good_checkpoint(run_dir)
    return found if found is not None and (found / STATE_FILE).is_file() else None


def load_model(path: str | Path, device: str = "cpu") -> HybridLM:
    """Open a trained model from a `save_pretrained` directory, a quantized one
    (`jobs/quantize.py`: INT8 runs on a CPU or GPU, INT4 on a CPU), a training checkpoint
    (fp32 master weights reassembled from the ZeRO shards by DeepSpeed's zero_to_fp32),
    a final checkpoint's `model/`, or a run directory (its latest checkpoint)."""
    path = Path(path)
    if (path / WEIGHTS_FILE).is_file() and (path / CONFIG_FILE).is_file():
        quantization = json.loads((path / CONFIG_FILE).read_text()).get("quantization")
        if quantization is None:
            return load_pretrained(path, device=device)
        from mamba_slm.platform.post.quantize import check_device, load_quantized

        model = load_quantized(path)
        check_device(model, device, path, "load it on the CPU (--device cpu in the jobs)")
        return model.to(device)
    if (path / "model" / WEIGHTS_FILE).is_file():
        return load_pretrained(path / "model", device=device)
    if not (path / STATE_FILE).is_file():
        latest = latest_checkpoint(path) or latest_checkpoint(path / "checkpoints")
        if latest is None:
            raise FileNotFoundError(
                f"{path} is neither a model directory (config.json + model.safetensors), a "
                f"training checkpoint ({STATE_FILE} + {DS_TAG}/) nor a run directory holding them")
        return load_model(latest, device)
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    _, config = read_train_state(path)
    cfg = ModelConfig.from_dict(config["model"])
    state = get_fp32_state_dict_from_zero_checkpoint(str(path), tag=DS_TAG)
    model = HybridLM(cfg)
    missing, unexpected = model.load_state_dict(_fill_tied(dict(state), cfg), strict=False)
    missing = [k for k in missing if not k.endswith("inv_freq")]
    if missing or unexpected:
        raise RuntimeError(f"checkpoint {path} does not match its config: missing {missing}, "
                           f"unexpected {unexpected}")
    return model.to(device).eval()
