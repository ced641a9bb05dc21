"""`write_in_place`, the collective that writes a checkpoint straight into shared storage,
over a real process group (gloo; NCCL with CUDA tensors on two GPUs): every rank's sealed
files land in one directory, published by one rename only after the slowest rank is done,
and the temporary directories left by writers killed mid-save are cleared
first."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch

from mamba_slm.platform.fault.integrity import seal_checkpoint, verify_checkpoint
from mamba_slm.platform.train.checkpoint import write_in_place

STEP = 4


def _write_in_place(rank: int, world: int, final_dir: str) -> str:
    def write(part: Path) -> None:
        (part / "ds").mkdir(parents=True)
        (part / "ds" / f"shard_rank{rank}.pt").write_bytes(os.urandom(2000))
        (part / f"rng_rank{rank}.pt").write_bytes(os.urandom(100))
        if rank == 1:
            time.sleep(1.5)  # the slow writer: nothing may be published before it has sealed
        seal_checkpoint(part, rank, world, STEP)

    write_in_place(Path(final_dir), rank, write)
    return verify_checkpoint(final_dir)  # what this rank sees once write_in_place returns


def _run(spawn_ranks, run_dir: Path, backend: str) -> None:
    final = run_dir / f"step_{STEP:08d}"
    stale = run_dir / f".tmp-{final.name}-999999" / ".rank1" / "ds"  # rank 1 killed mid-save
    stale.mkdir(parents=True)
    (stale / "shard_rank1.pt").write_bytes(b"torn")
    (final / "ds").mkdir(parents=True)  # an older write of the same step: replaced
    (final / "ds" / "old.pt").write_bytes(b"old")
    previous = run_dir / f"step_{STEP - 2:08d}"
    previous.mkdir()
    (previous / "keep.pt").write_bytes(b"previous")

    assert spawn_ranks(_write_in_place, 2, str(final), backend=backend) == {0: "", 1: ""}
    assert sorted(p.name for p in run_dir.iterdir()) == [previous.name, final.name], "leftovers"
    assert (previous / "keep.pt").read_bytes() == b"previous"
    files = sorted(p.relative_to(final).as_posix() for p in final.rglob("*") if p.is_file())
    assert files == ["ds/shard_rank0.pt", "ds/shard_rank1.pt", "integrity_rank0.json",
                     "integrity_rank1.json", "rng_rank0.pt", "rng_rank1.pt"]
    for rank in (0, 1):  # each manifest covers the files its rank wrote, no others
        manifest = json.loads((final / f"integrity_rank{rank}.json").read_text())
        assert sorted(manifest["files"]) == [f"ds/shard_rank{rank}.pt", f"rng_rank{rank}.pt"]


def test_two_ranks_write_one_checkpoint_in_place_over_gloo(spawn_ranks, tmp_path):
    _run(spawn_ranks, tmp_path, "gloo")


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs (NCCL)")
def test_two_ranks_write_one_checkpoint_in_place_over_nccl(spawn_ranks, tmp_path):
    _run(spawn_ranks, tmp_path, "nccl")


def test_a_resumed_checkpoint_ray_never_registered_is_pruned_once_enough_newer_ones_exist(tmp_path):
    """Ray prunes only what it registered; a checkpoint sealed in storage whose worker died
    before Ray registered it (the run resumed from it) is marked on disk, so that a later
    worker group still knows, and rank 0 prunes it once `keep` newer ones exist."""
    from mamba_slm.platform.train.loop import mark_unregistered, prune_unregistered

    for step in (4, 6):
        (tmp_path / f"step_{step:08d}").mkdir()
    mark_unregistered(tmp_path / "step_00000004")
    prune_unregistered(tmp_path, keep=2)
    assert (tmp_path / "step_00000004").is_dir(), "pruned with only one newer checkpoint"
    (tmp_path / "step_00000008").mkdir()
    prune_unregistered(tmp_path, keep=2)  # e.g. by a later worker group, after a restart
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000006", "step_00000008"]
    prune_unregistered(tmp_path, keep=1)  # registered ones are Ray's: untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000006", "step_00000008"]


def test_torn_temporary_dirs_of_any_step_are_cleared_before_a_write(tmp_path):
    from mamba_slm.platform.fault.integrity import fresh_temporary_dir

    for torn in (".tmp-step_00000003-111", ".tmp-step_00000004-222"):
        (tmp_path / torn / ".rank0").mkdir(parents=True)
    tmp = fresh_temporary_dir(tmp_path / "step_00000006")
    assert [p.name for p in tmp_path.iterdir()] == [tmp.name] and not any(tmp.iterdir())
