"""Typed configuration of a pretraining run and the named training presets.

Three dataclasses, one per concern:
- `TrainingConfig`: optimisation (batch, schedule, AdamW, DeepSpeed ZeRO, precision,
  stability guards, checkpoint cadence). Named presets: `TrainingConfig.from_name(...)`.
- `DataConfig`: where the curated shards are and how they are ordered.
- `RunConfig`: where the run lives and on what it runs (workers, GPUs, storage, wandb).

Every field is a CLI flag of `jobs/pretrain.py` (`--max-steps` and `--max_steps` alike);
the `help` metadata of each field is its `--help` text. All three round-trip through
plain dicts (`to_dict` / `from_dict`), which is what a checkpoint stores.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

SCHEDULES = ("cosine", "wsd")
PRECISIONS = ("auto", "bf16", "fp32")
ZERO_STAGES = (2, 3)


def _help(text: str, **kwargs) -> Any:
    return field(metadata={"help": text}, **kwargs)


@dataclass
class TrainingConfig:
    """How to optimise. `global_batch_size` is in sequences per optimizer step and stays
    fixed whatever the number of workers: gradient accumulation = global / (micro x workers)."""

    name: str = "custom"
    model_size: str = _help("model preset (mamba_slm.model.ModelConfig.from_name)", default="tiny")
    max_steps: int = _help("optimizer steps to train", default=100)
    global_batch_size: int = _help("sequences per optimizer step, over all workers", default=16)
    micro_batch_size: int = _help("sequences per worker per forward/backward", default=8)
    seq_len: int = _help("sequence length the preset expects its data curated at (the "
                         "data's manifest decides at run time; a mismatch is logged)", default=256)
    lr: float = _help("peak learning rate", default=3e-3)
    min_lr_ratio: float = _help("final learning rate as a fraction of the peak", default=0.1)
    schedule: str = _help(f"learning-rate schedule: {' | '.join(SCHEDULES)} (wsd = "
                          "warmup-stable-decay)", default="cosine")
    warmup_steps: int = _help("linear warmup steps", default=10)
    decay_fraction: float = _help("wsd: fraction of max_steps spent in the final decay",
                                  default=0.2)
    schedule_steps: int = _help("steps the learning-rate schedule spans (0 = max_steps); set "
                                "it above max_steps to train a longer run in stages, each "
                                "stage resuming with a higher max_steps on the same schedule",
                                default=0)
    weight_decay: float = _help("AdamW decoupled weight decay (not on 1-D params, A_log, "
                                "D, dt_bias)", default=0.1)
    beta1: float = 0.9
    beta2: float = 0.95
    adam_eps: float = 1e-8
    grad_clip: float = _help("clip the global gradient norm to this (0 = off)", default=1.0)
    zero_stage: int = _help("DeepSpeed ZeRO stage: 2 (shard optimizer + grads) or 3 (also "
                            "params)", default=2)
    offload_optimizer: bool = _help("ZeRO-Offload: optimizer state on the CPU", default=False)
    offload_param: bool = _help("ZeRO-3 only: parameters on the CPU", default=False)
    precision: str = _help("auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32", default="auto")
    activation_checkpointing: bool = _help("recompute block activations in backward",
                                           default=False)
    float8: bool = _help("experimental: the blocks' matmuls in float8 (torchao, one dynamic "
                         "scale per tensor; GPUs of compute capability 8.9+: H100, H200, L4); "
                         "weights, optimizer state and checkpoints do not change. 1.11x on the "
                         "bare 1.3B model at 8K, but slower through this job on one H200 "
                         "(bench/RESULTS.md): measure first", default=False)
    seed: int = _help("seed of the weights and of the data order", default=1234)
    checkpoint_every: int | str = _help("save a checkpoint every N steps (0 = only at the end), "
                                        "or 'auto': the Young/Daly interval from the measured "
                                        "write time and --preemptions-per-hour", default=50)
    max_bad_steps: int = _help("stop (with a checkpoint) after this many skipped steps in "
                               "a row", default=5)
    spike_factor: float = _help("a step whose loss exceeds this x the running mean is "
                                "skipped as a spike (0 = off)", default=3.0)
    spike_warmup_steps: int = _help("no spike test during the first N steps (the loss "
                                    "falls fast there)", default=20)
    eval_every: int = _help("every N steps and at the last one, the loss on the data's val "
                            "split (0 = off)", default=0)
    eval_batches: int = _help("global batches of the val split per evaluation (the same rows "
                              "each time; fewer if the split is smaller)", default=10)
    token_target: int = _help("tokens the preset is sized for (informational: steps x "
                              "global batch x seq_len)", default=0)

    def __post_init__(self) -> None:
        for name in ("max_steps", "global_batch_size", "micro_batch_size", "seq_len"):
            _positive_int(self, name)
        if self.checkpoint_every != "auto" and (not isinstance(self.checkpoint_every, int)
                                                or self.checkpoint_every < 0):
            raise ValueError(f"TrainingConfig.checkpoint_every={self.checkpoint_every!r}: must be "
                             "an integer >= 0 or 'auto'")
        for name in ("warmup_steps", "spike_warmup_steps", "seed", "eval_every"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ValueError(f"TrainingConfig.{name}={getattr(self, name)!r}: must be an integer >= 0")
        if not isinstance(self.schedule_steps, int) or self.schedule_steps < 0 or \
                0 < self.schedule_steps < self.max_steps:
            raise ValueError(f"TrainingConfig.schedule_steps={self.schedule_steps!r}: must be 0 "
                             f"(= max_steps) or >= max_steps={self.max_steps}")
        if not isinstance(self.eval_batches, int) or self.eval_batches < 1:
            raise ValueError(f"TrainingConfig.eval_batches={self.eval_batches!r}: must be an integer >= 1")
        if self.max_bad_steps < 1:
            raise ValueError(f"TrainingConfig.max_bad_steps={self.max_bad_steps}: must be >= 1")
        if self.global_batch_size % self.micro_batch_size:
            raise ValueError(
                f"TrainingConfig.global_batch_size={self.global_batch_size} is not a multiple "
                f"of micro_batch_size={self.micro_batch_size}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"TrainingConfig.schedule={self.schedule!r}: expected one of {SCHEDULES}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"TrainingConfig.precision={self.precision!r}: expected one of {PRECISIONS}")
        if self.zero_stage not in ZERO_STAGES:
            raise ValueError(f"TrainingConfig.zero_stage={self.zero_stage!r}: expected one of {ZERO_STAGES}")
        if self.float8 and self.zero_stage == 3 and not self.activation_checkpointing:
            # torchao saves each weight (a view of the gathered parameter) for backward, which
            # keeps every layer's gathered weights alive from forward to backward: the whole
            # model on every GPU. Recomputation saves them one layer at a time.
            raise ValueError("TrainingConfig.float8 with zero_stage=3 needs activation_checkpointing "
                             "(else every layer's gathered weights stay alive until backward); add "
                             "--activation-checkpointing or use --zero-stage 2")
        if self.offload_param and self.zero_stage != 3:
            raise ValueError("TrainingConfig.offload_param needs zero_stage=3 (ZeRO-2 keeps "
                             "full parameters on every worker)")
        self._check_optimizer()
        self._check_warmup()

    def _check_optimizer(self) -> None:
        # Every float first: NaN passes `nan < 0` and `nan <= 1` unnoticed.
        for name in ("lr", "min_lr_ratio", "decay_fraction", "weight_decay", "beta1", "beta2", "adam_eps",
                     "grad_clip", "spike_factor"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"TrainingConfig.{name}={value!r}: must be a finite number")
        if not self.lr > 0:
            raise ValueError(f"TrainingConfig.lr={self.lr}: must be > 0")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"TrainingConfig.min_lr_ratio={self.min_lr_ratio}: must be in [0, 1]")
        if not 0.0 < self.decay_fraction <= 1.0:
            raise ValueError(f"TrainingConfig.decay_fraction={self.decay_fraction}: must be in (0, 1]")
        for name in ("beta1", "beta2"):  # torch's AdamW refuses anything else, in every worker
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"TrainingConfig.{name}={getattr(self, name)}: must be in [0, 1)")
        if not self.adam_eps > 0:
            raise ValueError(f"TrainingConfig.adam_eps={self.adam_eps}: must be > 0")
        if self.weight_decay < 0 or self.grad_clip < 0 or self.spike_factor < 0:
            raise ValueError("TrainingConfig.weight_decay, grad_clip and spike_factor must be >= 0")
        if self.spike_factor and self.spike_factor <= 1.0:
            raise ValueError(f"TrainingConfig.spike_factor={self.spike_factor}: must be > 1 (or 0 = off)")

    def _check_warmup(self) -> None:
        """A WSD warmup that ends inside the final decay would jump from the peak to the
        middle of the decay (100 steps, decay_fraction 0.2, warmup 90: 1.0 -> 0.505 at step
        90). A warmup as long as the whole schedule is allowed (a few-step smoke run with a
        preset's warmup): the learning rate then only ramps up, and the launcher says so."""
        horizon = self.schedule_steps or self.max_steps
        if self.schedule != "wsd" or self.warmup_steps >= horizon:
            return
        decay_start = self.wsd_decay_start()
        if self.warmup_steps > decay_start:
            raise ValueError(
                f"TrainingConfig.warmup_steps={self.warmup_steps} ends inside the wsd decay, which starts "
                f"at step {decay_start} (the last decay_fraction={self.decay_fraction:g} of {horizon} steps): "
                f"use --warmup-steps <= {decay_start} or a smaller --decay-fraction")

    def wsd_decay_start(self) -> int:
        """The step the wsd schedule starts its final decay at (schedule.lr_at)."""
        horizon = self.schedule_steps or self.max_steps
        return horizon - max(1, round(self.decay_fraction * horizon))

    def tokens_per_step(self, seq_len: int | None = None) -> int:
        return self.global_batch_size * (seq_len or self.seq_len)

    def grad_accum_steps(self, world_size: int) -> int:
        """Micro-batches per worker per step; the global batch is fixed, so this adapts
        to the number of workers (the hook for elastic training)."""
        per_worker, rest = divmod(self.global_batch_size, self.micro_batch_size * world_size)
        if rest or per_worker == 0:
            raise ValueError(
                f"global_batch_size={self.global_batch_size} is not a multiple of "
                f"micro_batch_size={self.micro_batch_size} x {world_size} workers; pick a global "
                "batch that divides evenly (or change --micro-batch-size)")
        return per_worker

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> "TrainingConfig":
        if name not in TRAINING_PRESETS:
            raise ValueError(f"unknown training config {name!r}; choose one of {sorted(TRAINING_PRESETS)}")
        return cls(**{**TRAINING_PRESETS[name]["training"], "name": name, **overrides})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainingConfig":
        return cls(**_known(cls, d))


@dataclass
class DataConfig:
    path: str = _help("curated data directory (manifest.json + shards); empty = build the "
                      "demo corpus with mamba_slm.platform.data.ensure_demo_data()", default="")
    split: str = _help("manifest split to train on", default="train")
    shuffle_window_blocks: int = _help("rows are shuffled within windows of this many Parquet "
                                       "row groups (bigger = better mixing, more memory)", default=8)

    def __post_init__(self) -> None:
        _positive_int(self, "shuffle_window_blocks")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DataConfig":
        return cls(**_known(cls, d))


@dataclass
class RunConfig:
    name: str = _help("run name: a run with the same name and storage path resumes from its "
                      "latest checkpoint", default="")
    output_dir: str = _help("local directory for the final model, metrics and plots "
                            "(default ./runs/<name>)", default="")
    storage_path: str = _help("where Ray Train stores checkpoints: a directory or a cloud URI "
                              "(s3://, gs://); default <output_dir>/checkpoints", default="")
    num_workers: int = _help("training workers (one per GPU); 0 = run in this process", default=2)
    min_workers: int = _help("elastic floor: train on as few as this many workers (0 = fixed "
                             "size)", default=0)
    resize_every_s: float = _help("elastic runs: check every X seconds whether lost workers can "
                                  "come back, and grow to them (restarts from the latest "
                                  "checkpoint)", default=60.0)
    use_gpu: bool = _help("one GPU per worker (DeepSpeed over NCCL); off = CPU over gloo",
                          default=False)
    cpus_per_worker: float = _help("CPUs reserved per worker", default=1.0)
    max_failures: int = _help("worker-group restarts Ray Train may do (each resumes from the "
                              "latest checkpoint)", default=0)
    resume_from: str = _help("start a run that has no checkpoint of its own from this checkpoint "
                             "(or the latest intact one of this run directory); once the run has "
                             "its own, restarts resume from those", default="")
    wandb: bool = _help("log to Weights & Biases (offline without WANDB_API_KEY)", default=True)
    wandb_project: str = "mamba-slm"
    plot: bool = _help("write loss_curve.png at the end", default=True)
    log_every: int = _help("print a console line every N steps (every step goes to wandb "
                           "and metrics.jsonl)", default=10)
    keep_checkpoints: int = _help("keep the newest N checkpoints in storage", default=3)
    profile_steps: str = _help("profile these steps of rank 0 with torch.profiler, e.g. '5-7' "
                               "('' = off): <output_dir>/profile/ gets the share of wall time the "
                               "GPU was busy, the top operators and a Chrome trace", default="")
    save_final: bool = _help("at max-steps, write a last checkpoint and the model (off for "
                             "throughput runs; a stop for preemption or bad steps still saves)",
                             default=True)
    # Spot capacity (mamba_slm.platform.fault).
    preemption_notices: str = _help("preemption notices to act on, comma-separated: sigterm, aws "
                                    "(EC2 spot/instance-action), gcp (GCE preempted); '' = none",
                                    default="sigterm")
    preemption_grace_s: float = _help("after a notice, finish the step, checkpoint and exit within "
                                      "this many seconds (match the pod's grace period)", default=30.0)
    notice_poll_s: float = _help("poll the cloud notice endpoints every X seconds", default=5.0)
    aws_metadata_url: str = _help("EC2 metadata endpoint (default http://169.254.169.254)", default="")
    gcp_metadata_url: str = _help("GCE metadata endpoint (default http://metadata.google.internal)",
                                  default="")
    preemptions_per_hour: float = _help("expected preemptions per node-hour, for "
                                        "--checkpoint-every auto", default=0.0)

    def __post_init__(self) -> None:
        if self.num_workers < 0 or self.min_workers < 0 or self.max_failures < 0:
            raise ValueError("RunConfig.num_workers, min_workers and max_failures must be >= 0")
        if self.min_workers > self.num_workers:
            raise ValueError(f"RunConfig.min_workers={self.min_workers} exceeds num_workers={self.num_workers}")
        if self.log_every < 1 or self.keep_checkpoints < 1:
            raise ValueError("RunConfig.log_every and keep_checkpoints must be >= 1")
        if self.preemption_grace_s <= 0 or self.notice_poll_s <= 0 or self.preemptions_per_hour < 0:
            raise ValueError("RunConfig.preemption_grace_s and notice_poll_s must be > 0, "
                             "preemptions_per_hour >= 0")
        from mamba_slm.platform.fault.preemption import build_notices

        build_notices(self.preemption_notices)  # raises ValueError naming a bad kind
        if self.resize_every_s < 0:
            raise ValueError(f"RunConfig.resize_every_s={self.resize_every_s}: must be >= 0")
        if self.cpus_per_worker <= 0:
            raise ValueError(f"RunConfig.cpus_per_worker={self.cpus_per_worker}: must be > 0")
        from .profiling import parse_profile_steps

        parse_profile_steps(self.profile_steps)  # raises ValueError naming the flag

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RunConfig":
        return cls(**_known(cls, d))


def check_run_fits(training: TrainingConfig, run: RunConfig) -> None:
    """Checks across the two configs (JobSpec runs them, so every caller gets them):
    `checkpoint_every='auto'` needs `preemptions_per_hour`, and the global batch divides
    over every worker count the run may train on. An elastic run (min_workers set) can
    start, or restart after losing nodes, at any size from min_workers to num_workers:
    a size that does not divide would fail in every worker, on every restart."""
    if training.checkpoint_every == "auto" and not run.preemptions_per_hour > 0:
        raise ValueError("--checkpoint-every auto needs --preemptions-per-hour X > 0 (the expected "
                         "preemptions per node-hour of your capacity, e.g. 0.05 for spot GPUs)")
    high = max(1, run.num_workers)  # 0 = in this process: one worker
    low = run.min_workers or high
    bad = [w for w in range(low, high + 1) if not _divides(training, w)]
    if not bad:
        return
    if low == high:
        training.grad_accum_steps(high)  # raises, naming the batch and the worker count
    per_step = training.micro_batch_size * math.lcm(*range(low, high + 1))
    batch = per_step * max(1, -(-training.global_batch_size // per_step))
    narrower = next((m for m in range(low + 1, high + 1) if all(_divides(training, w) for w in range(m, high + 1))),
                    None)
    floor = f", or a narrower elastic range (--min-workers {narrower})" if narrower else ""
    raise ValueError(
        f"global_batch_size={training.global_batch_size} does not divide into micro-batches of "
        f"{training.micro_batch_size} on {', '.join(map(str, bad))} worker(s), and this elastic run "
        f"(--min-workers {low} --num-workers {high}) may train on any count in between: use a global batch "
        f"divisible by micro_batch_size x each count, e.g. --global-batch-size {batch}{floor}")


def _divides(training: TrainingConfig, world: int) -> bool:
    per_worker, rest = divmod(training.global_batch_size, training.micro_batch_size * world)
    return per_worker > 0 and rest == 0


def _positive_int(obj: Any, name: str) -> None:
    value = getattr(obj, name)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{type(obj).__name__}.{name}={value!r}: must be a positive integer")


def _known(cls, d: dict[str, Any]) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"{cls.__name__} got unknown fields {unknown}")
    return d


def _steps(tokens: float, batch: int, seq_len: int) -> int:
    return math.ceil(tokens / (batch * seq_len))


# Presets -------------------------------------------------------------------------------
# The seed's four training configs. Learning rates follow the GPT-3 / Pythia sizes
# (Brown et al. 2020, table 2.1: ~2e-4 at 1.3B-2.7B, 1.2e-4 at 6.7B, scaled up a little
# for the shorter, hybrid runs); batches are ~1M tokens at 1.3B growing to ~4M at 6.7B.
# `run` holds the RunConfig defaults of the preset (workers and GPUs).
TRAINING_PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    # The laptop default: tiny model, 2 CPU workers, a couple of minutes.
    "quick_test": {
        "training": dict(model_size="tiny", max_steps=100, global_batch_size=16, micro_batch_size=8,
                         seq_len=256, lr=3e-3, warmup_steps=10, checkpoint_every=50,
                         eval_every=25, eval_batches=4, zero_stage=2, token_target=100 * 16 * 256),
        "run": dict(num_workers=2, use_gpu=False),
    },
    "small_scale": {  # 4 GPUs: 1.3B on 10B tokens
        "training": dict(model_size="1.3B", seq_len=2048, global_batch_size=512, micro_batch_size=8,
                         max_steps=_steps(10e9, 512, 2048), lr=3e-4, warmup_steps=1000,
                         checkpoint_every=500, eval_every=500, zero_stage=2, token_target=int(10e9)),
        "run": dict(num_workers=4, use_gpu=True, cpus_per_worker=8),
    },
    "medium_scale": {  # 8 GPUs: 2.7B on 100B tokens
        "training": dict(model_size="2.7B", seq_len=4096, global_batch_size=512, micro_batch_size=4,
                         max_steps=_steps(100e9, 512, 4096), lr=2.5e-4, warmup_steps=2000,
                         schedule="wsd", checkpoint_every=1000, eval_every=1000, zero_stage=3,
                         activation_checkpointing=True, token_target=int(100e9)),
        "run": dict(num_workers=8, use_gpu=True, cpus_per_worker=8, max_failures=10),
    },
    "large_scale": {  # 16 GPUs: 6.7B on 300B tokens
        "training": dict(model_size="6.7B", seq_len=8192, global_batch_size=512, micro_batch_size=2,
                         max_steps=_steps(300e9, 512, 8192), lr=1.5e-4, warmup_steps=2000,
                         schedule="wsd", checkpoint_every=1000, eval_every=1000, zero_stage=3,
                         activation_checkpointing=True, token_target=int(300e9)),
        "run": dict(num_workers=16, use_gpu=True, cpus_per_worker=8, max_failures=20),
    },
}


def format_presets() -> str:
    """The table `python jobs/pretrain.py --print-configs` prints."""
    cols = ("preset", "model", "workers", "gpu", "zero", "global batch", "micro", "seq",
            "tokens/step", "steps", "tokens", "lr", "schedule", "warmup", "act ckpt")
    rows = []
    for name in TRAINING_PRESETS:
        t = TrainingConfig.from_name(name)
        r = RunConfig(**TRAINING_PRESETS[name]["run"])
        tokens = t.max_steps * t.tokens_per_step()
        rows.append((name, t.model_size, str(r.num_workers), "yes" if r.use_gpu else "no",
                     str(t.zero_stage), str(t.global_batch_size), str(t.micro_batch_size),
                     str(t.seq_len), f"{t.tokens_per_step():,}", f"{t.max_steps:,}",
                     _human(tokens), f"{t.lr:g}", t.schedule, str(t.warmup_steps),
                     "yes" if t.activation_checkpointing else "no"))
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(cols), line(["-" * w for w in widths])] + [line(r) for r in rows])


def _human(n: float) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(int(n))
