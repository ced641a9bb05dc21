"""LoRA supervised fine-tuning through Ray Train + DeepSpeed, like pretraining.

LoRA (Hu et al. 2021) adapters from `peft` on every projection of the network: attention
q/k/v/o_proj, MLP gate/up/down_proj and Mamba-2 in_proj/out_proj (all plain nn.Linear);
the base weights, embeddings, norms, conv and SSM parameters stay frozen. The loss is on
assistant tokens only (`platform.post.chat`). At the end, rank 0 merges the adapters into
the base weights (W + B A * alpha / r) and writes a `save_pretrained` model directory
(`<output>/model`, what jobs/serve.py, jobs/quantize.py and evaluation load) plus the
adapter alone (`<output>/adapter`, peft format).

The pretraining platform (`mamba_slm.platform.train`) provides the pieces: process group
setup, the DeepSpeed config and AdamW parameter groups, the learning-rate schedule, the
step (loss averaged over workers, bad steps skipped), checkpoints (sealed with checksums,
written in place in a storage directory or uploaded to a bucket, as pretraining's are:
platform/train/storage.py) and metrics. A worker killed mid-run resumes from the last
intact checkpoint, chosen by rank 0 for every worker (`max_failures`). ZeRO stage 2 only:
LoRA's optimizer state is tiny, and stage 3 would partition the frozen base weights,
which the merge then has to gather.

Data order: conversations are shuffled per epoch with the seed; the global batch of step
s is samples [s*B, (s+1)*B) of that endless order, each worker takes a contiguous slice,
right-padded to its longest row (padding is after every real token, so causal layers never
see it, and its labels are -100).

Held-out loss: with `eval_data` (a chat JSONL) or `eval_fraction` (that share of `data`'s
conversations, picked with the seed and left out of training), the loss on assistant tokens
of those conversations (token-weighted over all of them, each worker every world-th one) is
logged as `val_loss` every `training.eval_every` steps and at the end.
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mamba_slm.model.io import TOKENIZER_FILE, load_config, load_pretrained, save_pretrained
from mamba_slm.platform.evaluate.checkpoint import find_eos
from mamba_slm.platform.train.config import TrainingConfig
from mamba_slm.platform.train.data import Batch

from .chat import encode_conversation, load_chat_jsonl
from .loading import check_model_dir

KEEP_CHECKPOINTS = 2  # in storage: Ray Train's num_to_keep (in local mode the loop prunes)
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                "in_proj", "out_proj")


@dataclass
class LoraConfig:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = LORA_TARGETS

    def __post_init__(self) -> None:
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"LoraConfig.rank={self.rank!r}: must be a positive integer")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoraConfig.dropout={self.dropout}: must be in [0, 1)")
        unknown = sorted(set(self.targets) - set(LORA_TARGETS))
        if unknown or not self.targets:
            raise ValueError(f"LoraConfig.targets {list(self.targets)}: choose from {LORA_TARGETS}")
        self.targets = tuple(self.targets)


@dataclass
class FinetuneJob:
    """Everything a worker needs, as plain data (absolute paths)."""
    checkpoint: str
    data: str
    output_dir: str
    training: TrainingConfig
    lora: LoraConfig = field(default_factory=LoraConfig)
    max_seq_len: int = 0  # truncate conversations to this many tokens (0 = the model's)
    num_workers: int = 2
    cpus_per_worker: float = 1.0
    use_gpu: bool = False
    max_failures: int = 0
    name: str = "finetune"
    eval_data: str = ""  # held-out chat JSONL
    eval_fraction: float = 0.0  # or this share of `data`'s conversations, left out of training

    def __post_init__(self) -> None:
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ValueError(f"eval_fraction={self.eval_fraction}: must be in [0, 1)")
        if self.eval_fraction and self.eval_data:
            raise ValueError("give eval_data or eval_fraction, not both")
        if self.training.zero_stage != 2:  # held_out_loss and the merge assume whole weights on every worker
            raise ValueError(f"fine-tuning runs ZeRO-2 only, not zero_stage={self.training.zero_stage}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "FinetuneJob":
        return cls(**{**d, "training": TrainingConfig.from_dict(d["training"]), "lora": LoraConfig(**d["lora"])})


def tokenize_chats(job: FinetuneJob, path: str | None = None) -> tuple[list[tuple[list[int], list[int]]], int]:
    """((input_ids, labels) per conversation of `path`, default `job.data`; eos_id).
    Conversations are truncated to max_seq_len; those left with no assistant token are dropped."""
    from tokenizers import Tokenizer

    path = path or job.data
    tokenizer = Tokenizer.from_file(str(Path(job.checkpoint) / TOKENIZER_FILE))
    eos, _ = find_eos(tokenizer, json.loads((Path(job.checkpoint) / "config.json").read_text()))
    limit = job.max_seq_len or load_config(job.checkpoint).max_seq_len
    examples = []
    for messages in load_chat_jsonl(path):
        inputs, labels = encode_conversation(tokenizer, messages, eos).inputs_and_labels()
        inputs, labels = inputs[:limit], labels[:limit]
        if any(t != -100 for t in labels):
            examples.append((inputs, labels))
    if not examples:
        raise ValueError(f"{path}: no conversation keeps an assistant token within {limit} tokens")
    return examples, eos


def train_and_eval_examples(job: FinetuneJob):
    """-> (training examples, held-out examples (maybe empty), eos_id)."""
    examples, eos = tokenize_chats(job)
    if job.eval_data:
        return examples, tokenize_chats(job, job.eval_data)[0], eos
    if not job.eval_fraction:
        return examples, [], eos
    held = max(1, round(job.eval_fraction * len(examples)))
    if held >= len(examples):
        raise ValueError(f"eval_fraction={job.eval_fraction} of {len(examples)} conversations leaves none to train on")
    order = np.random.default_rng([job.training.seed, 1]).permutation(len(examples))
    out = set(order[:held].tolist())
    return ([x for i, x in enumerate(examples) if i not in out], [examples[i] for i in sorted(out)], eos)


def steps_per_epoch(n_examples: int, global_batch_size: int) -> int:
    return math.ceil(n_examples / global_batch_size)


def step_micro_batches(examples, sample_position: int, cfg: TrainingConfig, rank: int, world: int,
                       pad_id: int) -> list[Batch]:
    """This worker's micro-batches of the global batch starting at `sample_position`."""
    n, per_worker = len(examples), cfg.global_batch_size // world
    start = sample_position + rank * per_worker
    order = {}
    batches = []
    for mb in range(0, per_worker, cfg.micro_batch_size):
        rows = []
        for i in range(start + mb, start + mb + cfg.micro_batch_size):
            epoch = i // n
            if epoch not in order:
                order[epoch] = np.random.default_rng(cfg.seed + epoch).permutation(n)
            rows.append(int(order[epoch][i % n]))
        batches.append(padded_batch(examples, rows, pad_id))
    return batches


def padded_batch(examples, rows: list[int], pad_id: int) -> Batch:
    """The conversations `rows` right-padded to the longest (pad labels -100)."""
    width = max(len(examples[r][0]) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for j, r in enumerate(rows):
        x, y = examples[r]
        ids[j, : len(x)], labels[j, : len(y)] = torch.tensor(x), torch.tensor(y)
    return Batch(ids, labels, torch.zeros_like(ids, dtype=torch.int32), np.array(rows))


def held_out_loss(engine, examples, micro_batch: int, rank: int, world: int, pad_id: int) -> dict[str, float]:
    """Loss per assistant token over all held-out conversations (this worker: every
    world-th one), the same on every worker (one group each: ZeRO-2's forward needs no
    other worker, so the workers' counts of micro-batches may differ)."""
    from mamba_slm.platform.train.validation import held_out_metrics

    rows = list(range(rank, len(examples), world))
    mbs = [padded_batch(examples, rows[i:i + micro_batch], pad_id) for i in range(0, len(rows), micro_batch)]
    return held_out_metrics(engine, [mbs], world)


def build_lora_model(job: FinetuneJob):
    """The pretrained model with LoRA adapters; only adapter weights require grad."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    torch.manual_seed(job.training.seed)  # the same adapter init on every worker
    base = load_pretrained(job.checkpoint).train()
    if job.training.activation_checkpointing:
        base.set_gradient_checkpointing(True)
    peft_cfg = PeftLoraConfig(r=job.lora.rank, lora_alpha=job.lora.alpha, lora_dropout=job.lora.dropout,
                              target_modules=list(job.lora.targets), bias="none")
    return get_peft_model(base, peft_cfg)


def finetune_loop_per_worker(config: dict[str, Any]) -> None:
    import deepspeed

    from mamba_slm.platform.train.checkpoint import load_checkpoint
    from mamba_slm.platform.train.engine import deepspeed_config, param_groups, skip_shm_comm_op
    from mamba_slm.platform.train.loop import advance, node_position, setup_distributed, step_metrics, train_step
    from mamba_slm.platform.train.metrics import MetricsLogger
    from mamba_slm.platform.train.state import TrainState
    from mamba_slm.platform.train.storage import find_resume_checkpoint

    job = FinetuneJob.from_dict(config["job"])
    tcfg = job.training
    rank, world = setup_distributed(job.use_gpu, config["local_mode"])
    examples, held_out, eos_id = train_and_eval_examples(job)
    model = build_lora_model(job)
    skip_shm_comm_op()
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=param_groups(model, tcfg.weight_decay),
        config=deepspeed_config(tcfg, world, job.use_gpu), dist_init_required=False)
    state = TrainState()
    with ExitStack() as stack:
        resume_dir = find_resume_checkpoint(config, stack)  # rank 0 decides for all
        if resume_dir is not None:
            # on another number of workers than wrote it: converted through DeepSpeed's universal format
            state = load_checkpoint(engine, resume_dir, rank, world, node_position())
    logger = MetricsLogger(Path(job.output_dir), job.to_dict(), job.name, tcfg.max_steps, False, "", 10) \
        if rank == 0 else None
    while state.step < tcfg.max_steps:
        t0 = time.perf_counter()
        batches = step_micro_batches(examples, state.sample_position, tcfg, rank, world, eos_id)
        result = train_step(engine, batches, state, tcfg)
        tokens = sum(int((b.labels != -100).sum()) for b in batches)
        advance(state, result, tcfg, tcfg.seq_len)
        metrics = {**step_metrics(state, result, time.perf_counter() - t0, tokens * world, 0.0, None, world),
                   "assistant_tokens": tokens}
        if held_out and (state.step >= tcfg.max_steps or (tcfg.eval_every and state.step % tcfg.eval_every == 0)):
            metrics.update(held_out_loss(engine, held_out, tcfg.micro_batch_size, rank, world, eos_id))
        if logger is not None:
            logger.log(metrics)
        report_step(engine, job, config, state, metrics, rank, world)
    if logger is not None:
        logger.close()


def report_step(engine, job: FinetuneJob, config: dict[str, Any], state, metrics: dict[str, Any], rank: int,
                world: int) -> None:
    """Report every step (Ray needs the same number of calls on every worker); attach a
    checkpoint every `checkpoint_every` steps and at the end, where rank 0 also merges
    the adapters and writes the final model."""
    import ray.train

    from mamba_slm.platform.fault.integrity import seal_checkpoint
    from mamba_slm.platform.train.checkpoint import save_checkpoint
    from mamba_slm.platform.train.storage import save_and_report

    cfg = job.training
    final = state.step >= cfg.max_steps
    if not (final or (cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0)):
        ray.train.report(metrics)
        return

    def write(path: Path) -> None:  # collective: this worker's files, sealed
        save_checkpoint(engine, state, job.to_dict(), path, rank)
        if final and rank == 0:
            write_merged_model(engine.module, job, state.step)
        seal_checkpoint(path, rank, world, state.step)

    save_and_report(config, state.step, rank, KEEP_CHECKPOINTS, metrics, write)


@torch.no_grad()
def write_merged_model(peft_model, job: FinetuneJob, step: int) -> Path:
    """<output>/adapter (peft files) and <output>/model (adapters merged, save_pretrained)."""
    out = Path(job.output_dir)
    peft_model.save_pretrained(str(out / "adapter"))
    merged = peft_model.merge_and_unload().eval()
    base_meta = json.loads((Path(job.checkpoint) / "config.json").read_text())
    meta = {k: v for k, v in base_meta.items() if k != "model"}
    meta.update({"finetune": {"base": job.checkpoint, "data": job.data, "step": step,
                              "lora": dataclasses.asdict(job.lora), "training": job.training.to_dict()}})
    return save_pretrained(merged, out / "model", tokenizer_file=Path(job.checkpoint) / TOKENIZER_FILE,
                           metadata=meta)


def run_finetune(job: FinetuneJob) -> Path:
    """Start (or join) Ray, run the TorchTrainer, return the merged model directory."""
    import ray.train
    from ray.train.torch import TorchConfig

    from mamba_slm.platform.train.launcher import ensure_ray
    from mamba_slm.platform.train.raytrainer import Trainer

    check_model_dir(job.checkpoint)
    local_mode = job.num_workers == 0
    if not local_mode:
        ensure_ray(job.use_gpu)
    storage = Path(job.output_dir) / "checkpoints"
    trainer = Trainer(
        finetune_loop_per_worker,
        train_loop_config={"job": job.to_dict(), "local_mode": local_mode, "run_dir": str(storage / job.name)},
        torch_config=TorchConfig(backend="nccl" if job.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(num_workers=job.num_workers, use_gpu=job.use_gpu,
                                               resources_per_worker={"CPU": job.cpus_per_worker}),
        run_config=ray.train.RunConfig(
            name=job.name, storage_path=str(storage),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=KEEP_CHECKPOINTS),
            failure_config=ray.train.FailureConfig(max_failures=job.max_failures),
            logging_config=ray.train.LoggingConfig(log_level="WARNING")))
    trainer.fit()
    return Path(job.output_dir) / "model"
