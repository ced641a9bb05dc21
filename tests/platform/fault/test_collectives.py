"""`all_reduce_max`, the per-step agreement of the workers, over a real process group:
on gloo it reduces CPU tensors, and with NCCL (two GPUs) CUDA tensors, which is where it
broke on the first 2-GPU run (a CPU tensor handed to NCCL)."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from mamba_slm.platform.fault.worker import all_reduce_max


def _worker(rank: int, world: int, port: int, backend: str, out) -> None:
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        out.put((rank, all_reduce_max([float(rank), 10.0 - rank])))
    finally:
        dist.destroy_process_group()


def test_all_reduce_max_without_a_process_group_is_the_identity():
    assert all_reduce_max([1, 2.5]) == [1.0, 2.5]


def test_all_reduce_max_over_gloo(spawn_ranks):
    assert spawn_ranks(_worker, 2, "gloo") == {0: [1.0, 10.0], 1: [1.0, 10.0]}


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs (NCCL)")
def test_all_reduce_max_over_nccl(spawn_ranks):
    assert spawn_ranks(_worker, 2, "nccl") == {0: [1.0, 10.0], 1: [1.0, 10.0]}
