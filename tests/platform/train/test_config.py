"""Configs, presets, the CLI, learning-rate schedules and AdamW parameter groups (no Ray)."""
from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mamba_slm.model import HybridLM, ModelConfig
from mamba_slm.platform.train.cli import build_parser, configs_from_args
from mamba_slm.platform.train.checkpoint import optimizer_changes
from mamba_slm.platform.train.config import (TRAINING_PRESETS, DataConfig, RunConfig, TrainingConfig,
                                             check_run_fits, format_presets)
from mamba_slm.platform.train.engine import deepspeed_config, param_groups
from mamba_slm.platform.train.schedule import lr_at
from mamba_slm.platform.train.state import JobSpec


def test_presets_are_valid_and_sized_as_named():
    assert set(TRAINING_PRESETS) == {"quick_test", "small_scale", "medium_scale", "large_scale"}
    workers = {n: RunConfig(**p["run"]).num_workers for n, p in TRAINING_PRESETS.items()}
    assert workers == {"quick_test": 2, "small_scale": 4, "medium_scale": 8, "large_scale": 16}
    medium = TrainingConfig.from_name("medium_scale")
    assert medium.max_steps * medium.tokens_per_step() >= 100e9  # the 100B-token run
    for name in TRAINING_PRESETS:
        t = TrainingConfig.from_name(name)
        ModelConfig.from_name(t.model_size)  # names a real model preset
        t.grad_accum_steps(RunConfig(**TRAINING_PRESETS[name]["run"]).num_workers)  # divides
    table = format_presets()
    assert all(name in table for name in TRAINING_PRESETS) and "100.0B" in table


@pytest.mark.parametrize("field,value,needle", [
    ("schedule", "linear", "schedule"), ("zero_stage", 1, "zero_stage"), ("max_steps", 0, "max_steps"),
    ("micro_batch_size", 5, "global_batch_size"), ("precision", "fp8", "precision"),
    ("spike_factor", 0.5, "spike_factor"), ("eval_every", -1, "eval_every"), ("eval_batches", 0, "eval_batches"),
    # torch's AdamW refused these in every worker; NaN passed every `x < 0` check
    ("beta1", 1.5, "beta1"), ("beta2", 1.0, "beta2"), ("beta1", -0.1, "beta1"), ("adam_eps", 0.0, "adam_eps"),
    ("spike_factor", math.nan, "spike_factor=nan: must be a finite number"),
    ("weight_decay", math.nan, "weight_decay"), ("grad_clip", math.nan, "grad_clip"), ("lr", math.inf, "lr"),
    ("adam_eps", math.nan, "adam_eps"), ("beta2", math.nan, "beta2"),
])
def test_training_config_rejects_bad_fields(field, value, needle):
    with pytest.raises(ValueError, match=needle):
        TrainingConfig(**{field: value})


def test_offload_param_needs_zero3_and_grad_accum_adapts_to_workers():
    with pytest.raises(ValueError, match="zero_stage=3"):
        TrainingConfig(offload_param=True, zero_stage=2)
    t = TrainingConfig(global_batch_size=32, micro_batch_size=4)
    assert [t.grad_accum_steps(w) for w in (1, 2, 4, 8)] == [8, 4, 2, 1]
    with pytest.raises(ValueError, match="not a multiple"):
        t.grad_accum_steps(3)


def test_cli_accepts_dash_and_underscore_spellings_and_overrides_the_preset():
    parser = build_parser()
    a = configs_from_args(parser.parse_args(
        ["--training_config", "small_scale", "--model_size", "tiny", "--max_steps", "7",
         "--output_dir", "o", "--data_path", "d", "--zero-stage", "3", "--no-wandb", "--lr", "0.01"]))
    b = configs_from_args(parser.parse_args(
        ["--training-config", "small_scale", "--size", "tiny", "--max-steps", "7",
         "--output-dir", "o", "--data-path", "d", "--zero_stage", "3", "--no-wandb", "--lr", "0.01"]))
    assert a == b
    training, data, run = a
    assert (training.name, training.model_size, training.max_steps, training.zero_stage, training.lr) == \
        ("small_scale", "tiny", 7, 3, 0.01)
    assert training.global_batch_size == TRAINING_PRESETS["small_scale"]["training"]["global_batch_size"]
    assert (data.path, run.output_dir, run.wandb, run.num_workers, run.use_gpu) == ("d", "o", False, 4, True)


def test_job_exits_2_with_a_clear_message_on_bad_arguments(repo_root, tmp_path):
    cases = [(["--max-steps", "0"], "max_steps"), (["--zero-stage", "1"], "zero-stage"),
             (["--data-path", str(tmp_path)], "manifest.json"), (["--schedule", "step"], "schedule"),
             # local mode has no uploader: it used to write to a local dir named "s3:/bucket/runs"
             (["--num-workers", "0", "--storage-path", "s3://bucket/runs"], "--num-workers 0 trains in this process")]
    for argv, needle in cases:
        out = subprocess.run([sys.executable, "jobs/pretrain.py", *argv], cwd=repo_root,
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 2, (argv, out.stderr)
        assert needle in out.stderr and "Traceback" not in out.stderr
    out = subprocess.run([sys.executable, "jobs/pretrain.py", "--print-configs"], cwd=repo_root,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "medium_scale" in out.stdout


def test_cosine_schedule_warms_up_peaks_and_decays_to_the_floor():
    cfg = TrainingConfig(lr=1.0, min_lr_ratio=0.1, warmup_steps=10, max_steps=110, schedule="cosine")
    lrs = [lr_at(s, cfg) for s in range(110)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0) and lrs[10] == pytest.approx(1.0)
    assert all(a <= b for a, b in zip(lrs[:10], lrs[1:10]))
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    # half-way between the first step after the warmup (10) and the last update (109)
    assert lrs[10 + 99 // 2] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 49 / 99)))
    assert lrs[109] == pytest.approx(0.1, abs=1e-12)  # the last update is at the floor (was 0.10022)
    assert lr_at(110, cfg) == pytest.approx(0.1)
    staged = TrainingConfig(lr=1.0, min_lr_ratio=0.1, warmup_steps=10, max_steps=50, schedule_steps=110)
    assert [lr_at(s, staged) for s in range(50)] == lrs[:50]  # one schedule over the stages


def test_wsd_schedule_is_flat_then_decays_linearly_at_the_end():
    cfg = TrainingConfig(lr=2.0, min_lr_ratio=0.0, warmup_steps=5, max_steps=100, schedule="wsd",
                         decay_fraction=0.2)
    lrs = [lr_at(s, cfg) for s in range(100)]
    assert lrs[4] == pytest.approx(2.0) and set(lrs[5:80]) == {2.0}
    assert lrs[80] < 2.0 and lrs[99] == pytest.approx(0.0)
    steps = [lrs[i] - lrs[i + 1] for i in range(80, 99)]
    assert max(steps) - min(steps) < 1e-9  # linear


def test_a_wsd_warmup_may_not_end_inside_the_decay():
    """100 steps, the last 20 decaying: a warmup of 90 jumped from the peak to the middle of
    the decay (1.0 -> 0.505 at step 90). A warmup of the whole run (a smoke run with a
    preset's warmup) only ramps up, and is allowed."""
    with pytest.raises(ValueError, match="warmup_steps=90 ends inside the wsd decay, which starts at step 80.*"
                                         "--warmup-steps <= 80"):
        TrainingConfig(lr=1.0, max_steps=100, warmup_steps=90, schedule="wsd", decay_fraction=0.2)
    edge = TrainingConfig(lr=1.0, min_lr_ratio=0.1, max_steps=100, warmup_steps=80, schedule="wsd")
    lrs = [lr_at(s, edge) for s in range(100)]
    assert lrs[79] == 1.0 and all(a > b for a, b in zip(lrs[79:], lrs[80:])) and lrs[99] == pytest.approx(0.1)
    smoke = TrainingConfig(lr=1.0, max_steps=2, warmup_steps=2000, schedule="wsd")
    assert [lr_at(s, smoke) for s in range(2)] == [1 / 2000, 2 / 2000]


def test_elastic_runs_check_the_batch_for_every_worker_count():
    """min_workers..num_workers: a run may start at any size in between; 3 of 2..4 workers
    does not divide 32 into micro-batches of 8, which failed inside every worker."""
    t = TrainingConfig(global_batch_size=32, micro_batch_size=8)
    with pytest.raises(ValueError, match=r"micro-batches of 8 on 3 worker\(s\).*--min-workers 2 --num-workers 4.*"
                                         r"--global-batch-size 96, or a narrower elastic range \(--min-workers 4\)"):
        check_run_fits(t, RunConfig(num_workers=4, min_workers=2))
    check_run_fits(t, RunConfig(num_workers=4))  # fixed size: only 4
    check_run_fits(TrainingConfig(global_batch_size=96, micro_batch_size=8), RunConfig(num_workers=4, min_workers=2))
    with pytest.raises(ValueError, match="not a multiple of micro_batch_size=8 x 3 workers"):
        check_run_fits(t, RunConfig(num_workers=3))
    with pytest.raises(ValueError, match=r"on 2, 3 worker"):  # every bad count listed
        JobSpec(TrainingConfig(global_batch_size=8, micro_batch_size=8), DataConfig(),
                RunConfig(num_workers=3, min_workers=1), ModelConfig.from_name("tiny"))


def test_checkpoint_every_auto_needs_preemptions_per_hour_for_every_caller():
    """The check was in the CLI only; a JobSpec built in code (tune, chaos, tests) skipped it."""
    with pytest.raises(ValueError, match="--checkpoint-every auto needs --preemptions-per-hour"):
        JobSpec(TrainingConfig(checkpoint_every="auto"), DataConfig(), RunConfig(), ModelConfig.from_name("tiny"))
    JobSpec(TrainingConfig(checkpoint_every="auto"), DataConfig(), RunConfig(preemptions_per_hour=0.05),
            ModelConfig.from_name("tiny"))


def test_optimizer_changes_name_what_a_resume_changes():
    saved = {"training": TrainingConfig().to_dict()}
    assert optimizer_changes(saved, TrainingConfig()) == ""
    assert optimizer_changes(saved, TrainingConfig(weight_decay=0.0, beta2=0.99)) == \
        "weight_decay: checkpoint 0.1 -> now 0.0, beta2: checkpoint 0.95 -> now 0.99"


def test_param_groups_exclude_1d_and_marked_parameters_from_weight_decay():
    model = HybridLM(ModelConfig.from_name("tiny", vocab_size=256))
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    decay_names = {names[id(p)] for p in decay["params"]}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert any(n.endswith("A_log") for n in no_decay_names) and any(n.endswith(".D") for n in no_decay_names)
    assert any(n.endswith("dt_bias") for n in no_decay_names)
    assert any("layernorm" in n for n in no_decay_names)
    assert all(model.get_parameter(n).ndim >= 2 for n in decay_names)
    assert "embed_tokens.weight" in decay_names
    assert len(decay_names) + len(no_decay_names) == len(list(model.parameters()))


def test_deepspeed_config_follows_the_training_config():
    t = TrainingConfig(zero_stage=3, global_batch_size=32, micro_batch_size=4, offload_optimizer=True,
                       offload_param=True, grad_clip=0.5)
    gpu = deepspeed_config(t, world_size=4, use_gpu=True)
    assert gpu["gradient_accumulation_steps"] == 2 and gpu["train_batch_size"] == 32
    assert gpu["zero_optimization"]["stage"] == 3 and gpu["bf16"]["enabled"]
    assert gpu["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert gpu["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert gpu["gradient_clipping"] == 0.5 and "torch_adam" not in gpu["optimizer"]["params"]  # CPU Adam
    gpu_adamw = deepspeed_config(TrainingConfig(), 1, use_gpu=True)["optimizer"]["params"]
    assert gpu_adamw["torch_adam"] and gpu_adamw["fused"]  # torch's fused AdamW kernel on GPUs
    cpu = deepspeed_config(TrainingConfig(), world_size=2, use_gpu=False)
    assert not cpu["bf16"]["enabled"] and cpu["optimizer"]["params"]["torch_adam"]


def test_job_spec_round_trips_through_a_dict():
    job = JobSpec(TrainingConfig(max_steps=3), DataConfig(path="/d"), RunConfig(name="x"),
                  ModelConfig.from_name("tiny", vocab_size=300))
    again = JobSpec.from_dict(job.to_dict())
    assert again.to_dict() == job.to_dict() and again.model.padded_vocab_size == 320
    assert torch.tensor(0).item() == 0


def test_job_exit_code_says_whether_to_run_it_again(synthetic_data, tmp_path, monkeypatch, capsys):
    """0 finished, 1 stopped for a reason, 75 stopped by a preemption notice before the last
    step (a KubeRay RayJob retries only a failed driver: 0 there would end the run early)."""
    import importlib.util

    from mamba_slm.platform.train import launcher

    spec = importlib.util.spec_from_file_location("pretrain_job", Path(__file__).parents[3] / "jobs" / "pretrain.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    argv = ["--size", "tiny", "--max-steps", "8", "--data-path", str(synthetic_data), "--output-dir",
            str(tmp_path), "--no-wandb"]
    for last, code in (({"step": 8, "preempted": ""}, 0), ({"step": 3, "preempted": "SIGTERM"}, 75),
                       ({"step": 8, "preempted": "SIGTERM"}, 0), ({"step": 3, "preempted": "", "stop_reason": "nan"}, 1)):
        result = launcher.TrainResult(str(tmp_path), str(tmp_path), None, [], last, last.get("stop_reason", ""))
        monkeypatch.setattr(launcher, "run_pretraining", lambda job, result=result: result)
        assert job.main(argv) == code, last
        if code == 75:
            assert "preempted (SIGTERM) at step 3 of 8" in capsys.readouterr().err
