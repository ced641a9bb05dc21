"""The training loop in-process (Ray Train's local mode, num_workers=0): same loop
function, same DeepSpeed engine, a process group of one. Golden losses, bad-step
skipping, and the checkpoint / final-model formats."""
from __future__ import annotations

import json
import math
from dataclasses import replace as dataclasses_replace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from mamba_slm.platform.train import loop
from mamba_slm.platform.train.checkpoint import load_model
from mamba_slm.platform.train.config import DataConfig, RunConfig, TrainingConfig
from mamba_slm.platform.train.launcher import resolve_job, run_pretraining

# First 20 losses of the seeded tiny run below (CPU, fp32, ZeRO-2, torch 2.13, DeepSpeed 0.19.8).
# From the 8th on they follow the cosine schedule that reaches its floor at the last update
# (schedule.py; before, it stopped one step short: 5.1861, 5.13053, ... 4.80934).
GOLDEN = [5.56149, 5.50895, 5.41655, 5.36732, 5.31894, 5.25965, 5.21478, 5.18615, 5.13077, 5.04438,
          5.03782, 4.96127, 4.96442, 4.86042, 4.89464, 4.85369, 4.873, 4.85228, 4.80846, 4.83273]


def _job(data, out, name, **training):
    t = TrainingConfig(**{"max_steps": 20, "global_batch_size": 8, "micro_batch_size": 4,
                          "warmup_steps": 5, "lr": 3e-3, "checkpoint_every": 0, "seed": 1234, **training})
    return resolve_job(t, DataConfig(path=str(data)),
                       RunConfig(name=name, num_workers=0, output_dir=str(out / name),
                                 storage_path=str(out / "storage"), wandb=False, plot=True, log_every=5))


def test_golden_losses_and_final_outputs(synthetic_data, tmp_path):
    result = run_pretraining(_job(synthetic_data, tmp_path, "golden"))
    losses = [m["loss"] for m in result.metrics]
    assert len(losses) == 20 and losses[-1] < losses[0] - 0.2
    np.testing.assert_allclose(losses, GOLDEN, rtol=0, atol=2e-4)
    m = result.metrics[-1]
    assert m["step"] == 20 and m["tokens_seen"] == 20 * 8 * 64 and m["sample_position"] == 160
    assert m["grad_norm"] > 0 and m["tokens_per_s"] > 0 and m["mfu"] is None and m["mem_rss_gb"] > 0
    out = tmp_path / "golden"
    assert (out / "loss_curve.png").stat().st_size > 1000
    # The final model (save_pretrained) and the checkpoint's ZeRO shards hold the same weights
    # (load_model(checkpoint) would open the final checkpoint's model/ copy, so the shards
    # are read with DeepSpeed's zero_to_fp32).
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    final = load_model(out / "model").state_dict()
    shards = get_fp32_state_dict_from_zero_checkpoint(str(result.checkpoint), tag="ds")
    assert shards.keys() <= final.keys() and "layers.0.mixer.in_proj.weight" in shards
    for name, w in shards.items():
        torch.testing.assert_close(final[name], w, rtol=0, atol=0, msg=name)
    assert (out / "model" / "tokenizer.json").is_file()
    state = json.loads((tmp_path / "storage" / "golden" / "step_00000020" / "train_state.json").read_text())
    assert state["state"]["step"] == 20 and state["config"]["model"]["vocab_size"] == 256
    assert state["config"]["training"]["max_steps"] == 20


def test_zero3_follows_the_same_golden_losses(synthetic_data, tmp_path):
    """Same seed, same run under ZeRO-3: zero.Init builds the same initial weights
    (partitioned as each module is built, the model-wide init replayed on gathered ones)."""
    result = run_pretraining(_job(synthetic_data, tmp_path, "golden-z3", zero_stage=3))
    np.testing.assert_allclose([m["loss"] for m in result.metrics], GOLDEN, rtol=0, atol=2e-4)


@pytest.mark.parametrize("stage", [2, 3])
def test_final_model_holds_the_fp32_master_weights_under_bf16(synthetic_data, tmp_path, stage):
    """The final model/ is the checkpoint's fp32 masters, not the bf16 module weights."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    result = run_pretraining(_job(synthetic_data, tmp_path, f"bf16-z{stage}", max_steps=3, precision="bf16",
                                  zero_stage=stage))
    final = load_file(str(tmp_path / f"bf16-z{stage}" / "model" / "model.safetensors"))
    masters = get_fp32_state_dict_from_zero_checkpoint(str(result.checkpoint), tag="ds")
    assert final.keys() <= masters.keys() and "embed_tokens.weight" in final
    rounded = 0
    for name, w in final.items():
        assert w.dtype == torch.float32, name
        torch.testing.assert_close(w, masters[name], rtol=0, atol=0, msg=name)
        rounded += int(not torch.equal(w, w.bfloat16().float()))
    assert rounded, "every weight is exactly a bf16 value: these are not the fp32 masters"


def test_bad_steps_are_skipped_then_the_run_stops_with_a_checkpoint(synthetic_data, tmp_path, monkeypatch):
    real = loop.loss_threshold  # from step 3 on, every loss is a "spike": decided on the device
    monkeypatch.setattr(loop, "loss_threshold", lambda state, cfg: -math.inf if state.step >= 2 else real(state, cfg))
    result = run_pretraining(_job(synthetic_data, tmp_path, "bad", max_steps=10, checkpoint_every=2,
                                  max_bad_steps=2))
    steps = {m["step"]: m for m in result.metrics}
    assert sorted(steps) == [1, 2, 3, 4]
    assert not steps[2]["skipped"] and steps[3]["skipped"] and steps[4]["skipped"]
    assert steps[4]["skipped_steps"] == 2 and steps[3]["grad_norm"] is None
    assert "2 bad steps in a row" in result.stop_reason and "loss spike" in result.stop_reason
    assert steps[3]["skip_reason"].startswith("loss spike") and math.isfinite(steps[3]["loss"])  # the real loss
    # Skipped steps left the weights exactly as they were after step 2.
    storage = tmp_path / "storage" / "bad"
    before = load_model(storage / "step_00000002").state_dict()
    after = load_model(storage / "step_00000004").state_dict()
    for name in before:
        torch.testing.assert_close(before[name], after[name], rtol=0, atol=0, msg=name)
    assert load_file(str(tmp_path / "bad" / "model" / "model.safetensors"))

    # The cause fixed (here: the injection removed), the same run resumes past the stop.
    monkeypatch.setattr(loop, "loss_threshold", real)
    resumed = run_pretraining(_job(synthetic_data, tmp_path, "bad", max_steps=6, checkpoint_every=2,
                                   max_bad_steps=2))
    last = resumed.metrics[-1]
    assert resumed.stop_reason == "" and last["step"] == 6 and last["resumed_from_step"] == 4
    assert not last["skipped"] and last["skipped_steps"] == 2


def test_no_save_final_ends_without_writing_a_checkpoint_or_model(synthetic_data, tmp_path):
    job = _job(synthetic_data, tmp_path, "nosave", max_steps=3)
    job.run.save_final = False
    result = run_pretraining(job)
    assert [m["step"] for m in result.metrics] == [1, 2, 3] and result.stop_reason == ""
    assert result.checkpoint is None
    assert not (tmp_path / "nosave" / "model").exists()
    assert not list((tmp_path / "storage").glob("nosave/step_*"))


@pytest.mark.parametrize("every_s, calls", [(1e9, [3]), (0.0, [1, 2, 3])])
def test_metrics_go_to_ray_when_due_and_at_the_end(synthetic_data, tmp_path, monkeypatch, every_s, calls):
    # A report waits for Ray Train's controller to take the previous one (it polls every
    # 2 s), so the loop reports metrics at most every RAY_REPORT_EVERY_S, and always at the end.
    import ray.train

    reported = []
    real = ray.train.report
    monkeypatch.setattr(ray.train, "report", lambda metrics, **kw: (reported.append(metrics["step"]),
                                                                   real(metrics, **kw)))
    monkeypatch.setattr(loop, "RAY_REPORT_EVERY_S", every_s)
    job = _job(synthetic_data, tmp_path, f"report{every_s:g}", max_steps=3)
    job.run.save_final = False
    result = run_pretraining(job)
    assert reported == calls and result.last["step"] == 3


def test_storage_given_as_a_file_uri_is_a_directory(synthetic_data, tmp_path):
    """A file:// storage path is the same directory as its plain spelling, so resume's scan
    of the run's storage directory (and writing checkpoints in place) finds it."""
    job = resolve_job(TrainingConfig(max_steps=1), DataConfig(path=str(synthetic_data)),
                      RunConfig(name="r", output_dir=str(tmp_path / "out"), storage_path=f"file://{tmp_path}/store"))
    assert job.run.storage_path == str((tmp_path / "store").resolve())


def test_profile_steps_writes_tables_and_trace(synthetic_data, tmp_path):
    job = _job(synthetic_data, tmp_path, "profiled", max_steps=4)
    job.run.profile_steps = "2-3"
    run_pretraining(job)
    out = tmp_path / "profiled" / "profile"
    assert sorted(p.name for p in out.iterdir()) == ["steps_2-3.json.gz", "steps_2-3.txt"]
    text = (out / "steps_2-3.txt").read_text()
    assert text.startswith("steps 2-3 (2): wall ") and "top operators by host time" in text
    assert "aten::" in text  # the model's operators were recorded
    with pytest.raises(ValueError, match="profile_steps='3-2'"):
        RunConfig(profile_steps="3-2")


def test_resume_from_starts_a_new_run_then_yields_to_its_own_checkpoints(synthetic_data, tmp_path, caplog):
    """--resume-from: a new run starts from another run's checkpoint and continues it exactly
    (same config and data: the same losses); once the new run has checkpoints of its own, a
    restart resumes from those (with a warning that --resume-from is not used), not again from
    the given one. A path that does not exist is refused before anything starts."""
    import dataclasses

    base = run_pretraining(_job(synthetic_data, tmp_path, "base", max_steps=4, checkpoint_every=2))
    base_losses = {m["step"]: m["loss"] for m in base.metrics}

    def seeded(max_steps, resume_from):
        job = _job(synthetic_data, tmp_path, "seeded", max_steps=max_steps, checkpoint_every=2)
        return run_pretraining(dataclasses.replace(job, run=dataclasses.replace(job.run, resume_from=str(resume_from))))

    first = seeded(4, tmp_path / "storage" / "base" / "step_00000002")
    assert [m["step"] for m in first.metrics] == [3, 4] and first.last["resumed_from_step"] == 2
    for m in first.metrics:
        assert m["loss"] == pytest.approx(base_losses[m["step"]], abs=1e-5), m["step"]

    with caplog.at_level("WARNING", logger="mamba_slm.platform.train.storage"):
        again = seeded(6, tmp_path / "storage" / "base" / "step_00000002")  # not used: resumes at its own 4
    assert again.last["step"] == 6 and again.last["resumed_from_step"] == 4  # (metrics: the run's whole history)
    assert (tmp_path / "storage" / "seeded" / "step_00000004").is_dir()  # its own step 4, not base's
    assert "checkpoints of its own (step_00000004)" in caplog.text and "not from --resume-from" in caplog.text

    (tmp_path / "empty").mkdir()
    for where in ("nowhere", "empty"):  # a typo, or a directory without a checkpoint
        with pytest.raises(ValueError, match=f"--resume-from .*{where}: no checkpoint there"):
            resolve_job(TrainingConfig(max_steps=1), DataConfig(path=str(synthetic_data)),
                        RunConfig(name="r", output_dir=str(tmp_path / "r"), resume_from=str(tmp_path / where)))


def test_validation_loss_every_n_steps_on_the_same_val_rows(synthetic_data, tmp_path):
    """--eval-every 2: steps 2 and 4 carry the val split's loss, which is the training loss
    function on the first eval_batches global batches of `val` (recomputed here from the
    final model), and evaluating leaves training alone (the golden losses)."""
    from mamba_slm.platform.train.data import PackedSampleReader
    from mamba_slm.platform.train.metrics import format_line

    result = run_pretraining(_job(synthetic_data, tmp_path, "val", max_steps=4, eval_every=2, eval_batches=3))
    np.testing.assert_allclose([m["loss"] for m in result.metrics], GOLDEN[:4], rtol=0, atol=2e-4)
    assert [m["step"] for m in result.metrics if "val_loss" in m] == [2, 4]
    last = result.metrics[-1]
    model = load_model(tmp_path / "val" / "model")
    reader = PackedSampleReader(synthetic_data, "val", seed=1234)
    losses = []
    with torch.no_grad():
        for start in range(0, 3 * 8, 4):  # 3 global batches of 8 rows, micro-batches of 4
            mb = reader.batch(np.arange(start, start + 4))
            losses.append(model(mb.input_ids, seq_idx=mb.seq_idx, labels=mb.labels, return_logits=False).loss.item())
    assert last["val_loss"] == pytest.approx(sum(losses) / len(losses), abs=1e-5)
    assert last["val_ppl"] == pytest.approx(math.exp(last["val_loss"])) and last["val_loss"] < result.metrics[1]["val_loss"]
    assert f"val {last['val_loss']:.4f}" in format_line(last, 4, 1.0)


def test_validation_needs_a_val_split_of_one_global_batch(tmp_path):
    from mamba_slm.platform.train.synthetic import write_synthetic_dataset

    small = write_synthetic_dataset(tmp_path / "small", train_rows=64, val_rows=4, shards=1, row_group=16)
    cfg = TrainingConfig(max_steps=2, global_batch_size=8, micro_batch_size=4, eval_every=1)
    run = RunConfig(name="v", num_workers=0, output_dir=str(tmp_path / "v"))
    with pytest.raises(ValueError, match="'val' split has 4 rows, fewer than one global batch \\(8\\).*--eval-every 0"):
        resolve_job(cfg, DataConfig(path=str(small)), run)
    resolve_job(dataclasses_replace(cfg, eval_every=0), DataConfig(path=str(small)), run)  # off: no check


def test_validator_averages_the_val_rows_and_stops_for_a_preemption(synthetic_data):
    """The evaluation alone (one worker): the mean training loss over the first eval_batches
    global batches of `val`, model put back in train mode; nothing when a notice came."""
    from mamba_slm.model import HybridLM, ModelConfig
    from mamba_slm.platform.train.data import PackedSampleReader
    from mamba_slm.platform.train.validation import Validator

    cfg = TrainingConfig(global_batch_size=8, micro_batch_size=2, eval_batches=2, seed=7)
    model = HybridLM(ModelConfig.from_name("tiny", vocab_size=256)).train()
    model.device = torch.device("cpu")  # what evaluate reads of a DeepSpeed engine
    got = Validator(str(synthetic_data), cfg, rank=0, world=1).evaluate(model)
    assert model.training
    reader = PackedSampleReader(synthetic_data, "val", seed=7)
    with torch.no_grad():
        want = [model.eval()(b.input_ids, seq_idx=b.seq_idx, labels=b.labels, return_logits=False).loss.item()
                for b in (reader.batch(np.arange(i, i + 2)) for i in range(0, 16, 2))]
    assert got["val_loss"] == pytest.approx(sum(want) / len(want), abs=1e-6)
    assert Validator(str(synthetic_data), cfg, rank=0, world=1).evaluate(model, interrupted=lambda: True) is None
