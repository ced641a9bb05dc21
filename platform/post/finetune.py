"""LoRA supervised fine-tuning through Ray Train + DeepSpeed, like pretraining.

LoRA (Hu et al. 2021) adapters from `peft` on every projection of the network: attention
q/k/v/o_proj, MLP gate/up/down_proj and Mamba-2 in_proj/out_proj (all plain nn.Linear);
the base weights, embeddings, norms, conv and SSM parameters stay frozen. The loss is the
mean over the assistant tokens of the global batch (`platform.post.chat`,
`PerAssistantTokenLoss`), so the objective does not depend on the micro-batch size.

At the end, rank 0 merges the adapters into the base weights (W + B A * alpha / r) and
writes a `save_pretrained` model directory (`<output>/model`, what jobs/serve.py,
jobs/quantize.py and evaluation load) plus the adapter alone (`<output>/adapter`, peft
format). Both are fp32 whatever the training precision: under bf16 DeepSpeed casts the
whole module, frozen base included, to bf16 and keeps fp32 master copies of the trainable
(adapter) weights only, so the merge reloads the base from the checkpoint directory and
takes the adapters' fp32 masters. Both are written under a temporary name and renamed
(model/ last): a crash never leaves a partial model/, and a rerun of a finished run whose
model/ is missing writes it from the last checkpoint.

The pretraining platform (`mamba_slm.platform.train`) provides the pieces: process group
setup, the DeepSpeed config and AdamW parameter groups, the learning-rate schedule, the
step (loss averaged over workers, bad steps skipped; `max_bad_steps` in a row stop the run
with a checkpoint), checkpoints (sealed with checksums, written in place in a storage
directory or uploaded to a bucket, as pretraining's are: platform/train/storage.py) and
metrics. A worker killed mid-run resumes from the last intact checkpoint, chosen by rank 0
for every worker (`max_failures`). A checkpoint also holds the frozen base weights, so a
resume must be the same fine-tune: base, data, held-out share and LoRA settings are
checked against the checkpoint's saved job (`resume_mismatch`). ZeRO stage 2 only: LoRA's
optimizer state is tiny, and stage 3 would partition the frozen base weights, which the
merge then has to gather.

Data order: conversations are shuffled per epoch with the seed; the global batch of step
s is samples [s*B, (s+1)*B) of that endless order, each worker takes a contiguous slice,
right-padded to its longest row (padding is after every real token, so causal layers never
see it, and its labels are -100). `steps_for_epochs` turns epochs into steps.

Held-out loss: with `eval_data` (a chat JSONL) or `eval_fraction` (that share of `data`'s
distinct conversations, picked by a seeded hash of their content, so that exact duplicates
land on the same side, and left out of training), the loss on assistant tokens of those
conversations (token-weighted over all of them, each worker every world-th one) is logged
as `val_loss` every `training.eval_every` steps and at the end.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mamba_slm.model.io import TOKENIZER_FILE, WEIGHTS_FILE, load_config, load_pretrained, save_pretrained
from mamba_slm.platform.evaluate.checkpoint import find_eos
from mamba_slm.platform.train.config import TrainingConfig
from mamba_slm.platform.train.data import Batch

from .chat import encode_conversation, load_chat_jsonl
from .loading import check_model_dir

KEEP_CHECKPOINTS = 2  # in storage: Ray Train's num_to_keep (in local mode the loop prunes)
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                "in_proj", "out_proj")
# FinetuneJob fields a resumed run must share with its checkpoint, and the flags that set them
RESUME_FIELDS = {"checkpoint": "--checkpoint", "data": "--data", "eval_fraction": "--eval-fraction",
                 "lora": "--lora-rank/--lora-alpha/--lora-dropout/--lora-targets"}


class FinetuneIncomplete(RuntimeError):
    """The run ended without a merged model (stopped for bad steps, or failed)."""


@dataclass
class LoraConfig:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = LORA_TARGETS

    def __post_init__(self) -> None:
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"LoraConfig.rank={self.rank!r}: must be a positive integer")
        if not (math.isfinite(self.alpha) and self.alpha > 0):
            raise ValueError(f"LoraConfig.alpha={self.alpha}: must be a positive number (the adapters "
                             "are scaled by alpha / rank; 0 trains nothing)")
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

    @property
    def run_dir(self) -> Path:
        """The run's checkpoints (Ray Train's storage_path / name)."""
        return Path(self.output_dir) / "checkpoints" / self.name


def conversation_key(messages: list[dict]) -> str:
    """A hash of a conversation's content (every message's role and text): equal for exact
    duplicates, whatever their position in the file."""
    text = json.dumps([[m["role"], m["content"]] for m in messages], ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def keyed_examples(job: FinetuneJob, path: str | None = None):
    """([(conversation_key, (input_ids, labels))] per conversation of `path`, default
    `job.data`; eos_id). Conversations are truncated to max_seq_len; those left with no
    assistant token are dropped."""
    from tokenizers import Tokenizer

    path = path or job.data
    tokenizer = Tokenizer.from_file(str(Path(job.checkpoint) / TOKENIZER_FILE))
    eos, _ = find_eos(tokenizer, json.loads((Path(job.checkpoint) / "config.json").read_text()))
    limit = job.max_seq_len or load_config(job.checkpoint).max_seq_len
    keyed = []
    for messages in load_chat_jsonl(path):
        inputs, labels = encode_conversation(tokenizer, messages, eos).inputs_and_labels()
        inputs, labels = inputs[:limit], labels[:limit]
        if any(t != -100 for t in labels):
            keyed.append((conversation_key(messages), (inputs, labels)))
    if not keyed:
        raise ValueError(f"{path}: no conversation keeps an assistant token within {limit} tokens")
    return keyed, eos


def tokenize_chats(job: FinetuneJob, path: str | None = None) -> tuple[list[tuple[list[int], list[int]]], int]:
    """((input_ids, labels) per conversation of `path`, default `job.data`; eos_id)."""
    keyed, eos = keyed_examples(job, path)
    return [example for _, example in keyed], eos


@dataclass
class Examples:
    train: list
    held_out: list  # empty without eval_data or eval_fraction
    eos_id: int
    shared: int = 0  # eval_data conversations that also appear in the training data


def train_and_eval_examples(job: FinetuneJob) -> Examples:
    """The training and held-out conversations. eval_fraction holds out that share of the
    distinct conversations, ranked by a hash of the seed and their content, not by their
    position: exact duplicates land on the same side, so none leaks into training. With
    eval_data, `shared` counts its conversations that are in the training data too."""
    keyed, eos = keyed_examples(job)
    if job.eval_data:
        held, train_keys = keyed_examples(job, job.eval_data)[0], {k for k, _ in keyed}
        return Examples([x for _, x in keyed], [x for _, x in held], eos, sum(k in train_keys for k, _ in held))
    if not job.eval_fraction:
        return Examples([x for _, x in keyed], [], eos)
    distinct = sorted({k for k, _ in keyed},
                      key=lambda k: hashlib.sha256(f"{job.training.seed}:{k}".encode()).hexdigest())
    n_held = max(1, round(job.eval_fraction * len(distinct)))
    if n_held >= len(distinct):
        raise ValueError(f"eval_fraction={job.eval_fraction} of {len(distinct)} distinct conversations leaves "
                         "none to train on")
    out = set(distinct[:n_held])
    return Examples([x for k, x in keyed if k not in out], [x for k, x in keyed if k in out], eos)


def steps_for_epochs(epochs: float, n_examples: int, global_batch_size: int) -> int:
    """Optimizer steps for `epochs` passes over `n_examples` conversations: the fewest whose
    batches cover them, ceil(epochs x n / B), at least 1. The batch size is fixed, so the
    last step may take up to B - 1 conversations of the next pass (the order wraps)."""
    return max(1, math.ceil(round(epochs * n_examples / global_batch_size, 9)))


def global_batch_rows(n_examples: int, sample_position: int, global_batch_size: int, seed: int) -> list[int]:
    """The conversations of the global batch starting at `sample_position` of the endless
    order (a fresh seeded shuffle each epoch)."""
    order: dict[int, np.ndarray] = {}
    rows = []
    for i in range(sample_position, sample_position + global_batch_size):
        epoch = i // n_examples
        if epoch not in order:
            order[epoch] = np.random.default_rng(seed + epoch).permutation(n_examples)
        rows.append(int(order[epoch][i % n_examples]))
    return rows


def step_micro_batches(examples, sample_position: int, cfg: TrainingConfig, rank: int, world: int,
                       pad_id: int) -> list[Batch]:
    """This worker's micro-batches of the global batch starting at `sample_position`."""
    per_worker = cfg.global_batch_size // world
    rows = global_batch_rows(len(examples), sample_position, cfg.global_batch_size, cfg.seed)
    mine = rows[rank * per_worker:(rank + 1) * per_worker]
    return [padded_batch(examples, mine[i:i + cfg.micro_batch_size], pad_id)
            for i in range(0, per_worker, cfg.micro_batch_size)]


def batch_token_counts(examples, rows: list[int]) -> tuple[int, int]:
    """(tokens, assistant tokens) of the conversations `rows`, padding excluded."""
    return (sum(len(examples[r][0]) for r in rows),
            sum(sum(t != -100 for t in examples[r][1]) for r in rows))


def padded_batch(examples, rows: list[int], pad_id: int) -> Batch:
    """The conversations `rows` right-padded to the longest (pad labels -100)."""
    width = max(len(examples[r][0]) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for j, r in enumerate(rows):
        x, y = examples[r]
        ids[j, : len(x)], labels[j, : len(y)] = torch.tensor(x), torch.tensor(y)
    return Batch(ids, labels, torch.zeros_like(ids, dtype=torch.int32), np.array(rows))


class PerAssistantTokenLoss:
    """The DeepSpeed engine, each micro-batch's loss rescaled so that a step's gradient is
    that of the mean loss over all assistant tokens of its global batch, whatever
    --micro-batch-size. The model's loss is a mean over one micro-batch's assistant tokens,
    and DeepSpeed averages the micro-batches (1/grad_accum, then the mean over workers); a
    loss times n_mb x M / n_step (n: assistant tokens, M = grad_accum x workers) makes that
    average sum(loss_mb x n_mb) / n_step, which train_step also reports as the step loss.
    Set `step_tokens` (n_step) before each step; everything else is the engine's."""

    def __init__(self, engine, micro_batches_per_step: int):
        self.engine, self.micro_batches_per_step, self.step_tokens = engine, micro_batches_per_step, 1

    def __getattr__(self, name: str):
        return getattr(self.engine, name)

    def __call__(self, input_ids, labels, **kwargs):
        out = self.engine(input_ids, labels=labels, **kwargs)
        n = (labels != -100).sum()
        out.loss = out.loss * (n * self.micro_batches_per_step / self.step_tokens)
        return out


def held_out_loss(engine, examples, micro_batch: int, rank: int, world: int, pad_id: int) -> dict[str, float]:
    """Loss per assistant token over all held-out conversations (this worker: every
    world-th one), the same on every worker (one group each: ZeRO-2's forward needs no
    other worker, so the workers' counts of micro-batches may differ)."""
    from mamba_slm.platform.train.validation import held_out_metrics

    rows = list(range(rank, len(examples), world))
    mbs = [padded_batch(examples, rows[i:i + micro_batch], pad_id) for i in range(0, len(rows), micro_batch)]
    return held_out_metrics(engine, [mbs], world)


def with_lora(base, job: FinetuneJob):
    """`base` wrapped by peft with the job's adapters (only they require grad)."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    peft_cfg = PeftLoraConfig(r=job.lora.rank, lora_alpha=job.lora.alpha, lora_dropout=job.lora.dropout,
                              target_modules=list(job.lora.targets), bias="none")
    return get_peft_model(base, peft_cfg)


def build_lora_model(job: FinetuneJob):
    """The pretrained model with LoRA adapters; only adapter weights require grad."""
    torch.manual_seed(job.training.seed)  # the same adapter init on every worker
    base = load_pretrained(job.checkpoint).train()
    if job.training.activation_checkpointing:
        base.set_gradient_checkpointing(True)
    return with_lora(base, job)


def resume_mismatch(saved: dict[str, Any], job: FinetuneJob) -> str:
    """What a checkpoint's saved job (train_state.json "config") and `job` disagree on
    among RESUME_FIELDS, "" if nothing: DeepSpeed's checkpoint holds the frozen base and
    the adapters, so resuming it under another base, data or LoRA setting would silently
    go on training the saved ones."""
    now = json.loads(json.dumps(job.to_dict()))  # tuples as lists, as in train_state.json
    diffs = [f"{flag} (checkpoint: {saved.get(name)!r}, now: {now[name]!r})"
             for name, flag in RESUME_FIELDS.items() if saved.get(name) != now[name]]
    return "; ".join(diffs)


def newest_checkpoint(job: FinetuneJob):
    """(checkpoint, its TrainState, its saved job) of the run's newest checkpoint (the one a
    rerun resumes unless it is damaged), None if it has none."""
    from mamba_slm.platform.fault.integrity import checkpoints_newest_first
    from mamba_slm.platform.train.checkpoint import STATE_FILE, read_train_state

    for ckpt in checkpoints_newest_first(job.run_dir) if job.run_dir.is_dir() else []:
        if (ckpt / STATE_FILE).is_file():
            return (ckpt, *read_train_state(ckpt))
    return None


def finetune_loop_per_worker(config: dict[str, Any]) -> None:
    import deepspeed

    from mamba_slm.platform.train.checkpoint import load_checkpoint, read_train_state
    from mamba_slm.platform.train.engine import deepspeed_config, param_groups, skip_shm_comm_op
    from mamba_slm.platform.train.loop import advance, node_position, setup_distributed, step_metrics, train_step
    from mamba_slm.platform.train.metrics import MetricsLogger
    from mamba_slm.platform.train.state import TrainState
    from mamba_slm.platform.train.storage import find_resume_checkpoint

    job = FinetuneJob.from_dict(config["job"])
    tcfg = job.training
    rank, world = setup_distributed(job.use_gpu, config["local_mode"])
    data = train_and_eval_examples(job)
    examples = data.train
    model = build_lora_model(job)
    skip_shm_comm_op()
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=param_groups(model, tcfg.weight_decay),
        config=deepspeed_config(tcfg, world, job.use_gpu), dist_init_required=False)
    state = TrainState()
    with ExitStack() as stack:
        resume_dir = find_resume_checkpoint(config, stack)  # rank 0 decides for all
        if resume_dir is not None:
            if why := resume_mismatch(read_train_state(resume_dir)[1], job):  # jobs/finetune.py checks first
                raise ValueError(f"cannot resume {resume_dir}, a different fine-tune: {why}")
            # on another number of workers than wrote it: converted through DeepSpeed's universal format
            state = load_checkpoint(engine, resume_dir, rank, world, node_position())
    logger = MetricsLogger(Path(job.output_dir), job.to_dict(), job.name, tcfg.max_steps, False, "", 10) \
        if rank == 0 else None
    per_token = PerAssistantTokenLoss(engine, tcfg.grad_accum_steps(world) * world)
    while state.step < tcfg.max_steps and not state.stop_reason:
        t0 = time.perf_counter()
        rows = global_batch_rows(len(examples), state.sample_position, tcfg.global_batch_size, tcfg.seed)
        tokens, per_token.step_tokens = batch_token_counts(examples, rows)
        batches = step_micro_batches(examples, state.sample_position, tcfg, rank, world, data.eos_id)
        result = train_step(per_token, batches, state, tcfg)
        seen = state.tokens_seen
        advance(state, result, tcfg, tcfg.seq_len)  # (counts batch x seq_len, pretraining's packed rows)
        state.tokens_seen = seen + tokens
        metrics = {**step_metrics(state, result, time.perf_counter() - t0, tokens, 0.0, None, world),
                   "assistant_tokens": per_token.step_tokens}
        end = state.step >= tcfg.max_steps or bool(state.stop_reason)
        if data.held_out and (end or (tcfg.eval_every and state.step % tcfg.eval_every == 0)):
            metrics.update(held_out_loss(engine, data.held_out, tcfg.micro_batch_size, rank, world, data.eos_id))
        if logger is not None:
            logger.log(metrics)
        report_step(engine, job, config, state, metrics, rank, world)
    if state.step >= tcfg.max_steps and not state.stop_reason:
        # also where a rerun of a finished run lands without a step: its model/ was lost
        finish_model(engine, job, state.step, rank)
    if logger is not None:
        if state.stop_reason:
            logger.message(f"[red]{state.stop_reason}[/red]")
        logger.close()


def report_step(engine, job: FinetuneJob, config: dict[str, Any], state, metrics: dict[str, Any], rank: int,
                world: int) -> None:
    """Report every step (Ray needs the same number of calls on every worker); attach a
    checkpoint every `checkpoint_every` steps, at the end, and when bad steps stop the run."""
    import ray.train

    from mamba_slm.platform.fault.integrity import seal_checkpoint
    from mamba_slm.platform.train.checkpoint import save_checkpoint
    from mamba_slm.platform.train.storage import save_and_report

    cfg = job.training
    end = state.step >= cfg.max_steps or bool(state.stop_reason)
    if not (end or (cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0)):
        ray.train.report(metrics)
        return

    def write(path: Path) -> None:  # collective: this worker's files, sealed
        save_checkpoint(engine, state, job.to_dict(), path, rank)
        seal_checkpoint(path, rank, world, state.step)

    save_and_report(config, state.step, rank, KEEP_CHECKPOINTS, metrics, write)


def adapter_fp32_state(engine, rank: int) -> dict[str, torch.Tensor]:
    """Collective: the trainable (adapter) parameters as fp32 CPU tensors on rank 0 (empty
    elsewhere). Under bf16 they are the optimizer's fp32 master copies: the module's own
    parameters are bf16 roundings of them."""
    from deepspeed.utils import safe_get_full_fp32_param

    out = {}
    for name, p in engine.module.named_parameters():
        if not p.requires_grad:
            continue
        full = safe_get_full_fp32_param(p)  # an all-reduce over the workers; None if no optimizer holds it
        if rank == 0:
            out[name] = (p.detach() if full is None else full).float().cpu().clone()
    return out


def finish_model(engine, job: FinetuneJob, step: int, rank: int) -> None:
    """Collective: rank 0 writes the merged model unless a finished attempt already did."""
    adapters = adapter_fp32_state(engine, rank)
    if rank == 0 and not (Path(job.output_dir) / "model" / WEIGHTS_FILE).is_file():
        write_merged_model(job, adapters, step)


@torch.no_grad()
def write_merged_model(job: FinetuneJob, adapters: dict[str, torch.Tensor], step: int) -> Path:
    """<output>/adapter (peft files) and <output>/model (adapters merged, save_pretrained),
    in fp32: the base reloaded from job.checkpoint, the adapters from `adapters`
    (adapter_fp32_state). Written into a temporary directory and renamed into place,
    adapter/ first, so a model/ is always complete, with its adapter/ beside it."""
    out = Path(job.output_dir)
    peft_model = with_lora(load_pretrained(job.checkpoint).float(), job)
    names = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    if names != set(adapters):
        raise RuntimeError(f"the trained adapters do not match the LoRA config: missing "
                           f"{sorted(names - set(adapters))[:4]}, unexpected {sorted(set(adapters) - names)[:4]}")
    peft_model.load_state_dict(adapters, strict=False)
    for stale in out.glob(".tmp-final-*"):  # left by a writer that was killed
        shutil.rmtree(stale, ignore_errors=True)
    tmp = out / f".tmp-final-{os.getpid()}"
    tmp.mkdir(parents=True)
    peft_model.save_pretrained(str(tmp / "adapter"))
    merged = peft_model.merge_and_unload().eval()
    base_meta = json.loads((Path(job.checkpoint) / "config.json").read_text())
    meta = {k: v for k, v in base_meta.items() if k != "model"}
    meta.update({"finetune": {"base": job.checkpoint, "data": job.data, "step": step,
                              "lora": dataclasses.asdict(job.lora), "training": job.training.to_dict()}})
    save_pretrained(merged, tmp / "model", tokenizer_file=Path(job.checkpoint) / TOKENIZER_FILE, metadata=meta)
    if (out / "adapter").exists():  # an older attempt's, whose model/ never landed
        shutil.rmtree(out / "adapter")
    os.replace(tmp / "adapter", out / "adapter")
    os.replace(tmp / "model", out / "model")
    tmp.rmdir()
    return out / "model"


def run_finetune(job: FinetuneJob) -> Path:
    """Start (or join) Ray, run the TorchTrainer, return the merged model directory;
    FinetuneIncomplete if the run ended without writing it."""
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
        train_loop_config={"job": job.to_dict(), "local_mode": local_mode, "run_dir": str(job.run_dir)},
        torch_config=TorchConfig(backend="nccl" if job.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(num_workers=job.num_workers, use_gpu=job.use_gpu,
                                               resources_per_worker={"CPU": job.cpus_per_worker}),
        run_config=ray.train.RunConfig(
            name=job.name, storage_path=str(storage),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=KEEP_CHECKPOINTS),
            failure_config=ray.train.FailureConfig(max_failures=job.max_failures),
            logging_config=ray.train.LoggingConfig(log_level="WARNING")))
    trainer.fit()
    model_dir = Path(job.output_dir) / "model"
    if not (model_dir / WEIGHTS_FILE).is_file():
        newest = newest_checkpoint(job)
        why = newest[1].stop_reason if newest is not None else ""
        raise FinetuneIncomplete(f"the fine-tune ended without writing {model_dir}: "
                                 f"{why or 'see the log above'}")
    return model_dir
