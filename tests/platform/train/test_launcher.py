"""The driver's checks before any worker starts (launcher.resolve_job, jobs/pretrain.py):
bad arguments exit 2 with a message instead of failing in every worker, a checkpoint the
run cannot continue is refused up front, and what the launcher changes is logged. No Ray."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from mamba_slm.platform.train.checkpoint import STATE_FILE
from mamba_slm.platform.train.config import DataConfig, RunConfig, TrainingConfig
from mamba_slm.platform.train.launcher import resolve_job
from mamba_slm.platform.train.state import TrainState


@pytest.fixture(scope="module")
def pretrain_main():
    spec = importlib.util.spec_from_file_location("pretrain_job", Path(__file__).parents[3] / "jobs" / "pretrain.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    return job.main


def _job(data, tmp_path, name="run", **training):
    t = TrainingConfig(**{"max_steps": 4, "global_batch_size": 8, "micro_batch_size": 4, "warmup_steps": 1, **training})
    return resolve_job(t, DataConfig(path=str(data)),
                       RunConfig(name=name, num_workers=2, output_dir=str(tmp_path / name),
                                 storage_path=str(tmp_path / "storage"), wandb=False))


def _fake_checkpoint(path: Path, config: dict) -> Path:
    """A published checkpoint's directory as far as the launcher reads it (its train_state.json)."""
    path.mkdir(parents=True)
    (path / STATE_FILE).write_text(json.dumps({"state": TrainState(step=2).to_dict(), "config": config}))
    return path


def test_elastic_batch_that_does_not_divide_every_worker_count_exits_2(pretrain_main, synthetic_data, capsys):
    code = pretrain_main(["--data-path", str(synthetic_data), "--num-workers", "4", "--min-workers", "2",
                          "--global-batch-size", "32", "--micro-batch-size", "8", "--no-wandb"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "on 3 worker(s)" in err and "--global-batch-size 96" in err and "--min-workers 4" in err, err


@pytest.mark.parametrize("argv,needle", [
    (["--beta1", "1.5"], "beta1=1.5: must be in [0, 1)"), (["--spike-factor", "nan"], "spike_factor=nan"),
    (["--adam-eps", "0"], "adam_eps=0.0: must be > 0"),
    (["--checkpoint-every", "auto"], "--checkpoint-every auto needs --preemptions-per-hour"),
    (["--schedule", "wsd", "--max-steps", "100", "--warmup-steps", "90"], "ends inside the wsd decay"),
])
def test_bad_optimizer_arguments_exit_2_before_anything_starts(pretrain_main, synthetic_data, capsys, argv, needle):
    assert pretrain_main(["--data-path", str(synthetic_data), "--no-wandb", *argv]) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err, err


def test_resume_of_another_zero_stage_or_architecture_is_refused_up_front(synthetic_data, tmp_path, pretrain_main,
                                                                          capsys):
    """Found in the workers (a misleading "DeepSpeed found no checkpoint" for the stage;
    each refusal a restart of the worker group, up to --max-failures), now before they start."""
    saved = _job(synthetic_data, tmp_path, zero_stage=2).to_dict()
    _fake_checkpoint(tmp_path / "storage" / "run" / "step_00000002", saved)
    _job(synthetic_data, tmp_path, zero_stage=2, weight_decay=0.0)  # same network and stage: resumes
    with pytest.raises(ValueError, match="written with --zero-stage 2, this run asks for --zero-stage 3.*"
                                         "Resume with --zero-stage 2, or start a new run with another --name"):
        _job(synthetic_data, tmp_path, zero_stage=3)
    argv = ["--data-path", str(synthetic_data), "--name", "run", "--output-dir", str(tmp_path / "run"),
            "--storage-path", str(tmp_path / "storage"), "--no-wandb", "--zero-stage", "3"]
    assert pretrain_main(argv) == 2
    err = capsys.readouterr().err
    assert "--zero-stage 2" in err and "Traceback" not in err, err

    other = {**saved, "model": {**saved["model"], "hidden_size": 2 * saved["model"]["hidden_size"]}}
    _fake_checkpoint(tmp_path / "storage" / "wide" / "step_00000002", other)
    with pytest.raises(ValueError, match="different architecture \\(hidden_size: checkpoint"):
        _job(synthetic_data, tmp_path, name="wide")
    # a run without checkpoints of its own starting from --resume-from is checked against that one
    for given in (tmp_path / "storage" / "wide", tmp_path / "storage" / "wide" / "step_00000002"):
        with pytest.raises(ValueError, match="different architecture"):
            resolve_job(TrainingConfig(max_steps=4, global_batch_size=8, micro_batch_size=4, warmup_steps=1),
                        DataConfig(path=str(synthetic_data)),
                        RunConfig(name="fresh", num_workers=2, output_dir=str(tmp_path / "fresh"),
                                  storage_path=str(tmp_path / "storage"), resume_from=str(given)))


def test_a_damaged_train_state_is_left_to_the_workers(synthetic_data, tmp_path):
    """The launcher reads train_state.json by listing, without checksums: one it cannot read
    is skipped (the workers' verified choice falls back past it too)."""
    saved = _job(synthetic_data, tmp_path, zero_stage=2).to_dict()
    _fake_checkpoint(tmp_path / "storage" / "run" / "step_00000002", saved)
    (tmp_path / "storage" / "run" / "step_00000004").mkdir()
    (tmp_path / "storage" / "run" / "step_00000004" / STATE_FILE).write_text('{"state": {"st')
    with pytest.raises(ValueError, match="--zero-stage 2"):  # checked against step 2's
        _job(synthetic_data, tmp_path, zero_stage=3)


def test_the_launcher_logs_what_it_changes_or_cannot_honour(synthetic_data, tmp_path, caplog):
    """--help says a --seq-len the data disagrees with is logged; a warmup as long as the run
    never reaches the peak learning rate."""
    with caplog.at_level("WARNING", logger="mamba_slm.platform.train.launcher"):
        job = _job(synthetic_data, tmp_path, seq_len=256, max_steps=2, warmup_steps=10)
    assert job.training.seq_len == 64
    assert "--seq-len 256: the data in" in caplog.text and "curated at seq_len 64" in caplog.text
    assert "--warmup-steps 10 >= the 2 steps of the schedule" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="mamba_slm.platform.train.launcher"):
        _job(synthetic_data, tmp_path, name="quiet", seq_len=64)
    assert caplog.text == ""
