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
