"""Training checkpoints: the one module that writes and reads them.

A checkpoint directory (one per saved step, `step_00000050/` under the run's storage
path, assembled by Ray Train from every worker's files):

    train_state.json          step, sample position, counters, the full JobSpec config
    rng_rank{r}.pt            python / numpy / torch RNG state of worker r
    ds/                       DeepSpeed: weights, ZeRO-partitioned optimizer state
                              (engine.save_checkpoint, tag "ds"); zero_to_fp32 reads it
    model/                    (final checkpoint only) save_pretrained directory

`load_model(path)` opens either kind of directory (a `save_pretrained` model, a
checkpoint, or a run directory holding checkpoints) as a `HybridLM` on the CPU.
"""
from __future__ import annotations

import json
import logging
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mamba_slm.model import HybridLM, ModelConfig
from mamba_slm.model.io import CONFIG_FILE, WEIGHTS_FILE, load_pretrained, save_pretrained

from .state import TrainState

log = logging.getLogger(__name__)
STATE_FILE, DS_TAG = "train_state.json", "ds"
CHECKPOINT_PREFIX = "step_"


class ArchitectureMismatchError(ValueError):
    pass


def checkpoint_dir_name(step: int) -> str:
    return f"{CHECKPOINT_PREFIX}{step:08d}"


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


def load_checkpoint(engine, path: Path, rank: int) -> TrainState:
    """Collective: restore the engine (weights + optimizer) and this worker's RNG."""
    load_path, _ = engine.load_checkpoint(str(path), tag=DS_TAG, load_optimizer_states=True,
                                          load_lr_scheduler_states=False)
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
    return state


def gather_full_state_dict(engine, rank: int) -> dict[str, torch.Tensor]:
    """Collective: full fp32 CPU copies of the module's weights, kept on rank 0 only
    (ZeRO-3 gathers one parameter at a time, so no GPU holds the whole model)."""
    import deepspeed

    module = engine.module
    out = {}
    for name, p in module.named_parameters():
        with deepspeed.zero.GatheredParameters([p], enabled=hasattr(p, "ds_id")):
            if rank == 0:
                out[name] = p.detach().float().cpu().clone()
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
    """The newest complete checkpoint (has train_state.json) under a run directory."""
    found = sorted(p for p in Path(run_dir).glob(f"{CHECKPOINT_PREFIX}*") if (p / STATE_FILE).is_file())
    return found[-1] if found else None


def load_model(path: str | Path, device: str = "cpu") -> HybridLM:
    """Open a trained model from a `save_pretrained` directory, a training checkpoint
    (fp32 master weights reassembled from the ZeRO shards by DeepSpeed's zero_to_fp32),
    a final checkpoint's `model/`, or a run directory (its latest checkpoint)."""
    path = Path(path)
    if (path / WEIGHTS_FILE).is_file() and (path / CONFIG_FILE).is_file():
        return load_pretrained(path, device=device)
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
