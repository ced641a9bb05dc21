"""Model + DeepSpeed engine for one training worker.

`deepspeed_config` turns a `TrainingConfig` into DeepSpeed's JSON config (ZeRO stage,
offload, precision, batch arithmetic, AdamW); `build_engine` builds the model and calls
`deepspeed.initialize` inside the process group Ray Train already set up.

Weight decay: AdamW's decoupled decay is applied to matrices only; 1-D parameters (norm
weights, biases) and parameters marked `_no_weight_decay` (Mamba-2's A_log, D, dt_bias)
get none (GPT-2/nanoGPT convention; mamba_ssm marks the same three).
"""
from __future__ import annotations

import logging
from typing import Any

import torch
import torch.distributed as dist

from mamba_slm.model import HybridLM, ModelConfig

from .config import TrainingConfig

log = logging.getLogger(__name__)


def resolve_precision(cfg: TrainingConfig, use_gpu: bool) -> str:
    """auto -> bf16 on GPUs, fp32 on CPUs (DeepSpeed's CPU path trains bf16 too, but the
    tiny CPU runs are about numerics tests and golden losses, where fp32 is the reference)."""
    if cfg.precision == "auto":
        return "bf16" if use_gpu else "fp32"
    return cfg.precision


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two AdamW groups: decayed matrices, and the rest. Works on ZeRO-3 partitioned
    parameters too (their true shape is `ds_shape`)."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():  # tied weights appear once
        if not p.requires_grad:
            continue
        ndim = len(getattr(p, "ds_shape", p.shape))
        (no_decay if ndim < 2 or getattr(p, "_no_weight_decay", False) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay, "name": "decay"},
            {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]


def deepspeed_config(cfg: TrainingConfig, world_size: int, use_gpu: bool) -> dict[str, Any]:
    precision = resolve_precision(cfg, use_gpu)
    zero: dict[str, Any] = {
        "stage": cfg.zero_stage,
        "contiguous_gradients": True,
        # Overlapping the gradient reduction with backward needs CUDA streams.
        "overlap_comm": use_gpu,
        "reduce_bucket_size": 5e8 if use_gpu else 5e7,
    }
    if cfg.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": use_gpu}
    if cfg.offload_param:
        zero["offload_param"] = {"device": "cpu", "pin_memory": use_gpu}
    if cfg.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = False  # we consolidate ourselves
    adamw: dict[str, Any] = {"lr": cfg.lr, "betas": [cfg.beta1, cfg.beta2], "eps": cfg.adam_eps,
                             "weight_decay": cfg.weight_decay}
    if not cfg.offload_optimizer:
        # torch's AdamW instead of DeepSpeed's FusedAdam, whose JIT build needs nvcc on GPU
        # images and takes ~80 s on a CPU (FIELD-NOTES). On GPUs its fused kernel (DeepSpeed
        # passes the extra key through): the default `foreach` one took 32 ms of a 1.3B 8K
        # step on an H200, 2.6x the fused one (bench/RESULTS.md, session 10).
        # Offload brings DeepSpeed's CPU Adam, the fast one for optimizer state on the host.
        adamw["torch_adam"] = True
        if use_gpu:
            adamw["fused"] = True
    return {
        "train_batch_size": cfg.global_batch_size,
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": cfg.grad_accum_steps(world_size),
        "gradient_clipping": cfg.grad_clip,
        "zero_optimization": zero,
        # check_grad_overflow: a step whose gradients are not finite is skipped by
        # DeepSpeed itself; the loop relies on it to skip bad steps (see loop.py).
        "bf16": {"enabled": precision == "bf16", "check_grad_overflow": True},
        "optimizer": {"type": "AdamW", "params": adamw},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def skip_shm_comm_op() -> None:
    """Keep DeepSpeed's communication start-up from JIT-compiling its CPU shared-memory
    all-reduce op (g++, ~32 s on a fresh machine: a tenth of `make demo`, and every worker
    of a run waits on the build's lock). Only `inference_all_reduce` (DeepSpeed's inference
    tensor parallelism) uses that op; training reduces through torch.distributed. Call it
    before the first `deepspeed.init_distributed` / `deepspeed.initialize` of a process."""
    import importlib

    # by name: the attribute `deepspeed.comm.torch` is PyTorch itself (comm imports torch)
    ds_comm = importlib.import_module("deepspeed.comm.torch")
    if hasattr(ds_comm, "build_shm_op"):  # (a DeepSpeed without it builds whatever it builds)
        ds_comm.build_shm_op = lambda: None


def build_model(model_cfg: ModelConfig, cfg: TrainingConfig, ds_config: dict[str, Any],
                use_gpu: bool = False) -> HybridLM:
    """Build the model on every worker with the same seed. Under ZeRO-3 the parameters
    are partitioned as they are created (`zero.Init`), so no worker ever holds the whole
    fp32 model; the initial values are then set on rank 0 and scattered. Under ZeRO-2 on
    GPUs the model is built on the worker's GPU: on the host, eight workers of a 6.7B
    model would hold 8 x 27 GB of fp32 weights at once, and initialize them slowly."""
    import deepspeed

    torch.manual_seed(cfg.seed)
    if cfg.zero_stage != 3:
        with torch.device("cuda" if use_gpu else "cpu"):  # "cuda": the worker's current device
            model = HybridLM(model_cfg)
    else:
        with deepspeed.zero.Init(config_dict_or_path=ds_config):
            model = HybridLM(model_cfg)
        # zero.Init partitions each submodule as its __init__ returns: the submodules' own
        # inits (Mamba-2's dt_bias/A_log/D, conv weights) ran on whole tensors, but the
        # model-wide init in HybridLM.__init__ saw empty shards (and drew no random numbers):
        # replay it on gathered parameters, from the same point of the seeded stream, so the
        # weights are those a ZeRO-2 run of the same seed starts from.
        with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=0):
            if not dist.is_initialized() or dist.get_rank() == 0:
                model.reset_parameters()
    if cfg.float8:
        from .float8 import apply_float8
        apply_float8(model)
    if cfg.activation_checkpointing:
        model.set_gradient_checkpointing(True)
    return model


def build_engine(model_cfg: ModelConfig, cfg: TrainingConfig, world_size: int, use_gpu: bool):
    """-> (engine, ds_config). The engine owns the model, the AdamW optimizer (ZeRO-2/3)
    and the gradient accumulation / clipping arithmetic."""
    import deepspeed

    ds_config = deepspeed_config(cfg, world_size, use_gpu)
    skip_shm_comm_op()
    # Adopt the existing process group now: zero.Init checks the batch arithmetic
    # against DeepSpeed's view of the world size.
    deepspeed.init_distributed(dist_backend="nccl" if use_gpu else "gloo")
    model = build_model(model_cfg, cfg, ds_config, use_gpu)
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=param_groups(model, cfg.weight_decay), config=ds_config,
        dist_init_required=False)
    return engine, ds_config
