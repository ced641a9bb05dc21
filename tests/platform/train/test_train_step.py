"""train_step's bad-step decision, on a stand-in engine: made on the device (no read of
the loss between a micro-batch's forward and its backward), it poisons the backward of the
bad micro-batch and of every later one in the step, and reports the real losses."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from mamba_slm.platform.train import loop
from mamba_slm.platform.train.config import TrainingConfig
from mamba_slm.platform.train.state import TrainState


class Engine:
    """Forward returns the next scripted loss; backward records what it was given."""

    def __init__(self, losses):
        self.losses = iter(losses)
        self.backward_losses: list[float] = []
        self.device = torch.device("cpu")
        self.optimizer = SimpleNamespace(param_groups=[{}])

    def __call__(self, *args, **kwargs):
        return SimpleNamespace(loss=torch.tensor(next(self.losses), requires_grad=True))

    def backward(self, loss):
        self.backward_losses.append(loss.item())

    def step(self):
        pass

    def get_global_grad_norm(self):
        return 1.0

    def was_step_applied(self):  # DeepSpeed's overflow check: a NaN gradient drops the step
        return all(math.isfinite(v) for v in self.backward_losses)


def batch():
    ids = torch.zeros(1, 4, dtype=torch.long)
    return SimpleNamespace(input_ids=ids, seq_idx=ids, labels=ids)


@pytest.mark.parametrize("losses, poisoned, reason", [
    ([2.0, 2.2], [False, False], ""),
    ([2.0, math.inf], [False, True], "non-finite loss"),
    ([2.0, 7.0], [False, True], "loss spike 7.000 > 3 x running mean 2.000"),
    ([7.0, 2.0], [True, True], "loss spike 7.000 > 3 x running mean 2.000"),  # the rest of the step too
])
def test_a_bad_micro_batch_poisons_the_step_from_there_on(losses, poisoned, reason):
    cfg = TrainingConfig(spike_factor=3.0, spike_warmup_steps=5)
    state = TrainState(step=10, loss_ema=2.0)
    engine = Engine(losses)
    result = loop.train_step(engine, [batch() for _ in losses], state, cfg)
    assert [not math.isfinite(v) for v in engine.backward_losses] == poisoned
    assert result.skip_reason == reason and result.applied == (not any(poisoned))
    assert result.loss == pytest.approx(sum(losses) / len(losses))  # the real losses, not the poison


def test_no_spike_test_before_spike_warmup_steps_or_when_off():
    for cfg, state in ((TrainingConfig(spike_factor=3.0, spike_warmup_steps=5), TrainState(step=2, loss_ema=2.0)),
                       (TrainingConfig(spike_factor=0.0), TrainState(step=10, loss_ema=2.0))):
        result = loop.train_step(Engine([50.0]), [batch()], state, cfg)
        assert result.applied and result.skip_reason == ""
