"""`all_reduce_max`, the per-step agreement of the workers, over a real process group:
on gloo it reduces CPU tensors, and with NCCL (two GPUs) CUDA tensors, which is where it
broke on the first 2-GPU run (a CPU tensor handed to NCCL)."""
from __future__ import annotations

import pytest
import torch

from mamba_slm.platform.fault.worker import all_reduce_max


def _worker(rank: int, world: int) -> list[float]:
    return all_reduce_max([float(rank), 10.0 - rank])


def test_all_reduce_max_without_a_process_group_is_the_identity():
    assert all_reduce_max([1, 2.5]) == [1.0, 2.5]


def test_all_reduce_max_over_gloo(spawn_ranks):
    assert spawn_ranks(_worker, 2) == {0: [1.0, 10.0], 1: [1.0, 10.0]}


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs (NCCL)")
def test_all_reduce_max_over_nccl(spawn_ranks):
    assert spawn_ranks(_worker, 2, backend="nccl") == {0: [1.0, 10.0], 1: [1.0, 10.0]}
