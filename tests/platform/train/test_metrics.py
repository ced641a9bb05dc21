"""platform/train/metrics.py with a real wandb run (offline)."""
from __future__ import annotations

import pytest

from mamba_slm.platform.train.metrics import MetricsLogger, read_metrics

wandb = pytest.importorskip("wandb")


def test_steps_logged_again_after_a_restart_reach_wandb(tmp_path, monkeypatch, capfd):
    """A run restarted from a checkpoint logs its redone steps again under the same wandb run
    id, whose step counter (online, resumed from the server) is already past them; wandb drops
    records logged below its counter unless the x axis is a metric of ours. Offline runs do
    not resume the counter, so one process logging 1-4 then 3-5 stands in for the two."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    logger = MetricsLogger(tmp_path, {"lr": 1e-3}, "run-a", max_steps=5, use_wandb=True,
                           wandb_project="test", log_every=1)
    assert logger.wandb is not None
    for s in (1, 2, 3, 4, 3, 4, 5):
        logger.log(dict(step=s, loss=10.0 - s, lr=1e-3, grad_norm=1.0, tokens_per_s=1.0))
    logger.close()
    out = capfd.readouterr()
    assert "monotonically increasing" not in out.out + out.err  # "... so this data will be ignored"
    assert [m["step"] for m in read_metrics(tmp_path)] == [1, 2, 3, 4, 5]
