"""`write_in_place`, the collective that writes a checkpoint straight into shared storage,
over a real process group (gloo; NCCL with CUDA tensors on two GPUs): every rank's sealed
files land in one directory, published by one rename only after the slowest rank is done,
under a name never published before (rank 0 picks it), and the hidden directories left by
writers killed mid-save are cleared first. Then the resume decision, made by rank 0 alone
and opened by name under each rank's own view of storage."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from mamba_slm.platform.fault.integrity import seal_checkpoint, verify_checkpoint
from mamba_slm.platform.train.checkpoint import write_in_place

STEP = 4
TWO_GPUS = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs (NCCL)")


def _write_in_place(rank: int, world: int, run_dir: str) -> tuple[str, str]:
    from mamba_slm.platform.train.storage import new_checkpoint_name

    def write(part: Path) -> None:
        (part / "ds").mkdir(parents=True)
        (part / "ds" / f"shard_rank{rank}.pt").write_bytes(os.urandom(2000))
        (part / f"rng_rank{rank}.pt").write_bytes(os.urandom(100))
        if rank == 1:
            time.sleep(1.5)  # the slow writer: nothing may be published before it has sealed
        seal_checkpoint(part, rank, world, STEP)

    # rank 0 lists the run's directory (here as in local mode) and picks the name
    name = new_checkpoint_name({"local_mode": True, "run_dir": run_dir}, STEP, rank)
    final = write_in_place(Path(run_dir) / name, rank, write)
    return final.name, verify_checkpoint(final)  # what this rank sees once write_in_place returns


def _write_layout(run_dir: Path) -> None:
    first = run_dir / f"step_{STEP:08d}"
    stale = run_dir / f".tmp-{first.name}-999999" / ".rank1" / "ds"  # rank 1 killed mid-save
    stale.mkdir(parents=True)
    (stale / "shard_rank1.pt").write_bytes(b"torn")
    (run_dir / f".old-step_{STEP - 2:08d}-888" / "ds").mkdir(parents=True)  # killed inside an older publish
    (first / "ds").mkdir(parents=True)  # this step's checkpoint, damaged (the run fell back past it)
    (first / "ds" / "old.pt").write_bytes(b"old")
    previous = run_dir / f"step_{STEP - 2:08d}"
    previous.mkdir()
    (previous / "keep.pt").write_bytes(b"previous")


def _assert_written(run_dir: Path, got: dict[int, tuple[str, str]]) -> None:
    first, previous = run_dir / f"step_{STEP:08d}", run_dir / f"step_{STEP - 2:08d}"
    final = run_dir / f"{first.name}-r1"
    assert got == {0: (final.name, ""), 1: (final.name, "")}
    assert sorted(p.name for p in run_dir.iterdir()) == [previous.name, first.name, final.name], "leftovers"
    assert (previous / "keep.pt").read_bytes() == b"previous"
    assert (first / "ds" / "old.pt").read_bytes() == b"old", "the damaged checkpoint is kept for inspection"
    files = sorted(p.relative_to(final).as_posix() for p in final.rglob("*") if p.is_file())
    assert files == ["ds/shard_rank0.pt", "ds/shard_rank1.pt", "integrity_rank0.json",
                     "integrity_rank1.json", "rng_rank0.pt", "rng_rank1.pt"]
    for rank in (0, 1):  # each manifest covers the files its rank wrote, no others
        manifest = json.loads((final / f"integrity_rank{rank}.json").read_text())
        assert sorted(manifest["files"]) == [f"ds/shard_rank{rank}.pt", f"rng_rank{rank}.pt"]


def _sealed(run_dir: Path, step: int) -> Path:
    ckpt = run_dir / f"step_{step:08d}"
    ckpt.mkdir(parents=True)
    (ckpt / "train_state.json").write_text(json.dumps({"state": {"step": step}}))
    seal_checkpoint(ckpt, 0, 1, step)
    return ckpt


def _resume_layout(root: Path) -> None:
    for step in (4, 6):
        _sealed(root / "shared", step)  # Ray registered step 4; step 6 was sealed, never registered
        _sealed(root / "node0", step)   # storage on each node's own disk: only rank 0's holds them
    (root / "shared" / "step_00000008").mkdir()  # torn: the group died while writing it
    (root / "node1").mkdir()
    for node in (0, 1):  # with a bucket: Ray's checkpoint, downloaded once per node
        _sealed(root / f"download{node}", 6)
        (root / f"download{node}" / "step_00000010").mkdir()  # a damaged one (unsealed) Ray holds


def _resume(rank: int, world: int, root: str) -> dict[str, str | int]:
    """Each rank's resume checkpoint in three layouts of the run's storage (see the test)."""
    from contextlib import ExitStack, nullcontext

    from mamba_slm.platform.fault import integrity
    from mamba_slm.platform.train.storage import RayCheckpoint, find_resume_checkpoint

    root, hashed = Path(root), []
    sha256_file = integrity.sha256_file
    integrity.sha256_file = lambda path, *a: hashed.append(path) or sha256_file(path, *a)

    def resume(run_dir: Path, ray_latest: Path | None, older: tuple[Path, ...] = ()) -> str:
        """As if Ray Train held (had registered) `ray_latest` and `older`, each a local
        directory (what ray.train.Checkpoint.as_directory gives for one) or a node's download."""
        def held(path):
            return SimpleNamespace(path=str(path), as_directory=lambda: nullcontext(str(path)))
        RayCheckpoint.latest = classmethod(lambda cls, stack: ray_latest and cls(held(ray_latest), stack))
        RayCheckpoint.registered = classmethod(lambda cls, stack: {
            path.name: cls(held(path), stack) for path in ([ray_latest] if ray_latest else []) + list(older)})
        try:
            with ExitStack() as stack:
                return str(find_resume_checkpoint({"local_mode": False, "run_dir": str(run_dir)}, stack))
        except (FileNotFoundError, RuntimeError) as err:
            return f"{type(err).__name__}: {err}"

    from mamba_slm.platform.train import storage

    listing = integrity.checkpoints_newest_first
    if rank == 1:  # an NFS client's cached listing: step 6, renamed in just before the group died, is missing
        stale = lambda d: [c for c in listing(d) if c.name != "step_00000006"]  # noqa: E731
        integrity.checkpoints_newest_first = storage.checkpoints_newest_first = stale
    out = {"shared": resume(root / "shared", ray_latest=root / "shared" / "step_00000004"), "hashed": len(hashed)}
    integrity.checkpoints_newest_first = storage.checkpoints_newest_first = listing
    out["own_disk"] = resume(root / f"node{rank}", ray_latest=None)
    out["bucket"] = resume(root / "bucket-not-mounted", ray_latest=root / f"download{rank}" / "step_00000006")
    download = root / f"download{rank}"  # Ray's latest damaged: back to the older one Ray holds
    out["bucket_fallback"] = resume(root / "bucket-not-mounted", ray_latest=download / "step_00000010",
                                    older=(download / "step_00000006",))
    out["bucket_none"] = resume(root / "bucket-not-mounted", ray_latest=download / "step_00000010")
    return out


def _assert_resumed(root: Path, got: dict[int, dict]) -> None:
    shared = root / "shared"
    assert got[0]["shared"] == got[1]["shared"] == str(shared / "step_00000006")
    assert got[0]["hashed"] > 0 and got[1]["hashed"] == 0, "only rank 0 reads checksums"
    assert sorted(p.name for p in shared.glob(".unregistered-*")) == [".unregistered-step_00000006",
                                                                    ".unregistered-step_00000008"]
    assert got[1]["own_disk"].startswith("FileNotFoundError: rank 1 cannot see")
    assert str(root / "node1" / "step_00000006") in got[1]["own_disk"] and "not shared" in got[1]["own_disk"]
    assert got[0]["own_disk"].startswith("RuntimeError: rank 1 cannot open checkpoint step_00000006")
    assert got[0]["bucket"] == str(root / "download0" / "step_00000006")
    assert got[1]["bucket"] == str(root / "download1" / "step_00000006")
    for rank in (0, 1):
        assert got[rank]["bucket_fallback"] == str(root / f"download{rank}" / "step_00000006")
        assert got[rank]["bucket_none"].startswith("RuntimeError") and "--resume-from" in got[rank]["bucket_none"]


def _each_rank(rank: int, world: int, root: str) -> dict:
    """Both checks in one process group (spawning one costs ~5 s on 2 cores)."""
    written = _write_in_place(rank, world, str(Path(root) / "write"))
    return {"written": written, **_resume(rank, world, str(Path(root) / "resume"))}


def _run(spawn_ranks, root: Path, backend: str) -> None:
    _write_layout(root / "write")
    _resume_layout(root / "resume")
    got = spawn_ranks(_each_rank, 2, str(root), backend=backend)
    _assert_written(root / "write", {rank: got[rank].pop("written") for rank in got})
    _assert_resumed(root / "resume", got)


def test_checkpoint_collectives_over_gloo(spawn_ranks, tmp_path):
    """Writing: two ranks write step 4 in place, the slow one last; as step_00000004 holds
    a damaged earlier write, rank 0 names it step_00000004-r1 for both, and the damaged
    one stays; torn `.tmp-*` and `.old-*` dirs are cleared.

    Resuming, rank 0 alone decides and each rank opens the name under its own view of
    storage. Shared storage where rank 1's listing is stale: both ranks resume from the
    step-6 checkpoint rank 0 found (Ray registered step 4; step 8 is torn), and only rank
    0 reads checksums and marks what Ray does not hold (6 and 8) for pruning. Storage on
    each node's own disk: rank 1 cannot open the name and says so (path, likely cause),
    and rank 0 stops too instead of waiting. A bucket: each rank opens its own node's
    download of Ray's checkpoint; where Ray's latest is damaged, of the newest intact older
    one Ray holds (none: every rank stops, naming --resume-from)."""
    _run(spawn_ranks, tmp_path, "gloo")


@TWO_GPUS
def test_checkpoint_collectives_over_nccl(spawn_ranks, tmp_path):
    _run(spawn_ranks, tmp_path, "nccl")


def test_a_resumed_checkpoint_ray_never_registered_is_pruned_once_enough_newer_ones_exist(tmp_path):
    """Ray prunes only what it registered; a checkpoint sealed in storage whose worker died
    before Ray registered it (the run resumed from it) is marked on disk, so that a later
    worker group still knows, and rank 0 prunes it once `keep` newer ones exist."""
    from mamba_slm.platform.train.storage import mark_unregistered, prune_unregistered

    for name in ("step_00000004", "step_00000006-r2"):
        (tmp_path / name).mkdir()
    mark_unregistered(tmp_path / "step_00000004")
    prune_unregistered(tmp_path, keep=2)
    assert (tmp_path / "step_00000004").is_dir(), "pruned with only one newer checkpoint"
    (tmp_path / "step_00000006-r10").mkdir()  # newer than -r2 (not as text)
    mark_unregistered(tmp_path / "step_00000006-r2")
    prune_unregistered(tmp_path, keep=2)  # e.g. by a later worker group, after a restart
    assert sorted(p.name for p in tmp_path.iterdir()) == [".unregistered-step_00000006-r2", "step_00000006-r10",
                                                         "step_00000006-r2"]
    (tmp_path / "step_00000008").mkdir()
    prune_unregistered(tmp_path, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000006-r10", "step_00000008"]
    prune_unregistered(tmp_path, keep=1)  # registered ones are Ray's: untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000006-r10", "step_00000008"]


def test_torn_temporary_dirs_of_any_step_are_cleared_before_a_write(tmp_path):
    from mamba_slm.platform.fault.integrity import fresh_temporary_dir

    for torn in (".tmp-step_00000003-111", ".tmp-step_00000004-r1-222", ".old-step_00000002-333"):
        (tmp_path / torn / ".rank0").mkdir(parents=True)
    tmp = fresh_temporary_dir(tmp_path / "step_00000006")
    assert [p.name for p in tmp_path.iterdir()] == [tmp.name] and not any(tmp.iterdir())


def test_new_checkpoint_name_is_never_taken(tmp_path, monkeypatch):
    """Rank 0 names the next checkpoint past every name in use: published ones, ones a
    leftover unregistered-marker still claims, and ones a lagging listing misses."""
    from mamba_slm.platform.train import storage

    run = tmp_path / "run"
    (run / "step_00000006").mkdir(parents=True)
    (run / ".unregistered-step_00000008").touch()  # its checkpoint was deleted, the marker was not
    config = {"local_mode": True, "run_dir": str(run)}
    assert storage.new_checkpoint_name(config, 8, 0) == "step_00000008-r1"
    assert storage.new_checkpoint_name(config, 6, 0) == "step_00000006-r1"
    monkeypatch.setattr(storage, "names_in_storage", lambda cfg: ([], run))  # an NFS client's stale listing
    assert storage.new_checkpoint_name(config, 6, 0) == "step_00000006-r1"
    assert storage.new_checkpoint_name(config, 7, 0) == "step_00000007"
