"""Loading what training writes: a save_pretrained dir, or a checkpoint through
mamba_slm.platform.train.checkpoint.load_model (here a final checkpoint's model/)."""
from __future__ import annotations

import shutil

import pytest
import torch

from mamba_slm.platform.evaluate import CheckpointError, load_checkpoint


def test_final_training_checkpoint_layout(fact_models, tmp_path):
    ckpt = tmp_path / "checkpoint_000080"
    shutil.copytree(fact_models[0], ckpt / "model")
    (ckpt / "metrics.jsonl").write_text("")
    direct, via_train = load_checkpoint(fact_models[0]), load_checkpoint(ckpt)
    assert via_train.eos_id == direct.eos_id == 0 and via_train.eos_token == "<|endoftext|>"
    ids = torch.randint(0, 500, (1, 20))
    with torch.no_grad():
        assert torch.equal(direct.model(ids).logits, via_train.model(ids).logits)


def test_not_a_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="neither a model directory"):
        load_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing")


def _training_checkpoint(step_dir, config: dict):
    """A sealed training checkpoint directory (train_state.json + a stand-in ds/ file)."""
    import json

    from mamba_slm.platform.fault.integrity import seal_checkpoint

    (step_dir / "ds").mkdir(parents=True)
    (step_dir / "ds" / "mp_rank_00_model_states.pt").write_bytes(b"\0" * 1024)
    (step_dir / "train_state.json").write_text(json.dumps({"state": {"step": 2}, "config": config}))
    seal_checkpoint(step_dir, rank=0, world=1, step=2)
    return step_dir


def _finetune_config(output) -> dict:
    """The FinetuneJob config jobs/finetune.py saves: the base model under `checkpoint`, no `model`."""
    return {"checkpoint": "/base/model", "data": "chat.jsonl", "output_dir": str(output),
            "training": {"name": "finetune", "max_steps": 2}, "lora": {"rank": 8, "alpha": 16.0},
            "name": "finetune"}


def test_finetune_checkpoint_names_the_merged_model(evaluate_job, fact_models, tmp_path, capsys):
    out = tmp_path / "sft"
    run = out / "checkpoints" / "finetune"
    step = _training_checkpoint(run / "step_00000002", _finetune_config(out))
    for path in (step, run):  # the checkpoint, and the run directory holding it
        with pytest.raises(CheckpointError, match="LoRA fine-tune") as exc:
            load_checkpoint(path)
        assert f"{out / 'model'} once the fine-tune has finished" in str(exc.value)
    shutil.copytree(fact_models[0], out / "model")
    with pytest.raises(CheckpointError, match=f"--checkpoint {out / 'model'}$"):
        load_checkpoint(step)
    data = tmp_path / "data"
    data.mkdir()
    (data / "manifest.json").write_text("{}")  # never read: the checkpoint is refused first
    assert evaluate_job.main(["--checkpoint", str(run), "--perplexity", str(data), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "fine-tune" in err and str(out / "model") in err and "Traceback" not in err
    assert load_checkpoint(out).model.config == load_checkpoint(fact_models[0]).model.config  # <output> itself


def test_run_directory_tokenizer_is_found_without_hashing_checkpoints(fact_models, tmp_path, monkeypatch):
    """A run directory with its final model/: nothing of the checkpoints beside it is read,
    let alone SHA-256'd (optimizer states are ~100 GB at 6.7B)."""
    import mamba_slm.platform.fault.integrity as integrity

    run = tmp_path / "run"
    shutil.copytree(fact_models[0], run / "model")
    _training_checkpoint(run / "step_00000002", {"model": {}, "data": {"path": str(tmp_path / "nodata")}})
    hashed = []
    monkeypatch.setattr(integrity, "sha256_file", lambda path, *a, **k: hashed.append(path) or "")
    loaded = load_checkpoint(run)
    assert hashed == [] and loaded.eos_token == "<|endoftext|>"
