"""A run's checkpoints in its storage (a directory every worker reaches, or a bucket):
which one the workers resume from, the name and place of the next one, and the pruning
Ray Train does not do. The training loops (pretraining, platform/post/finetune.py)
call `find_resume_checkpoint` once and `save_and_report` at every checkpoint.

Resume is decided once, by rank 0, for every worker: rank 0 alone scans storage, checks
the candidates' checksums (platform/fault/integrity.py), marks the checkpoints Ray does
not hold for pruning, and broadcasts the chosen checkpoint's *name*; each worker then opens that
name under its own view of storage. Scans of their own could disagree: an NFS client
caches directory listings (up to `acdirmax`, 60 s by default, nfs(5)), so a node can miss
a checkpoint that rank 0 renamed into place just before the group died, while a lookup
by name asks the server. With a bucket, each node opens Ray's checkpoint as its own
download. A worker that cannot open the chosen name stops every worker with a message
(no worker waits in a collective for it).

Names are never reused (`integrity.unused_checkpoint_name`): a step checkpointed again
after a fallback past a damaged checkpoint is written as `step_N-r1`, and the damaged
`step_N` stays for inspection until keep-K pruning removes it.
"""
from __future__ import annotations

import logging
import shutil
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Callable, NamedTuple

import torch.distributed as dist

from mamba_slm.platform.fault.integrity import (checkpoint_name, checkpoint_order, checkpoints_newest_first,
                                                latest_good_checkpoint, prune_checkpoints,
                                                unused_checkpoint_name, verify_checkpoint)
from mamba_slm.platform.fault.worker import all_reduce_max, broadcast_from_rank0

from .checkpoint import STATE_FILE, write_in_place

log = logging.getLogger(__name__)
UNREGISTERED = ".unregistered-"  # + a checkpoint's name: a marker file in the run's directory
REGISTERED_TIMEOUT_S = 120.0  # a new worker group has no report in flight: Ray answers at once


class ResumeChoice(NamedTuple):
    """Rank 0's decision, broadcast to every worker. `source`: "run" (the run's storage
    directory), "ray" (Ray Train's registered checkpoint, opened per node: a bucket) or
    "resume_from" (`directory`, from --resume-from). `error`: why rank 0 found none."""
    name: str | None = None
    source: str = "run"
    directory: str = ""
    error: str = ""


class RayCheckpoint:
    """Ray Train's latest registered checkpoint of this run. `local_dir()` opens it on
    this node: the storage directory itself, or with a bucket a download that Ray makes
    once per node and removes when `stack` closes."""

    def __init__(self, checkpoint, stack: ExitStack):
        self.checkpoint, self.stack, self._dir = checkpoint, stack, None
        self.name = Path(checkpoint.path).name

    @classmethod
    def latest(cls, stack: ExitStack) -> "RayCheckpoint | None":
        import ray.train

        ckpt = ray.train.get_checkpoint()
        return cls(ckpt, stack) if ckpt is not None else None

    @classmethod
    def registered(cls, stack: ExitStack) -> "dict[str, RayCheckpoint]":
        """The checkpoints Ray Train holds for this run (registered, not pruned), by name."""
        import ray.train

        held = ray.train.get_all_reported_checkpoints(
            consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED, timeout_s=REGISTERED_TIMEOUT_S)
        return {Path(reported.checkpoint.path).name: cls(reported.checkpoint, stack) for reported in held}

    def local_dir(self) -> Path:
        if self._dir is None:
            self._dir = Path(self.stack.enter_context(self.checkpoint.as_directory()))
        return self._dir


def find_resume_checkpoint(config: dict[str, Any], stack: ExitStack, resume_from: str = "") -> Path | None:
    """Collective (after the process group exists): the checkpoint every worker starts
    from, as this worker sees it: the newest intact one of this run (Ray Train's latest,
    or a newer sealed one in its storage directory), else `resume_from`; None to start
    from scratch. A torn or corrupt one is skipped with a warning. `config` holds
    `local_mode` and `run_dir` (the run's directory in storage)."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    run_dir = Path(config["run_dir"])
    latest = None if config["local_mode"] else RayCheckpoint.latest(stack)
    choice, failure, registered = None, None, None
    if rank == 0:
        try:
            registered = None if config["local_mode"] else RayCheckpoint.registered(stack)
            choice = choose_resume_checkpoint(run_dir, latest, resume_from, registered)
        except Exception as err:  # the others must not wait for a choice that never comes
            choice, failure = ResumeChoice(error=f"{type(err).__name__}: {err}"), err
    choice = broadcast_from_rank0(choice)
    if failure is not None:
        raise failure
    if choice.error:
        raise RuntimeError(f"rank 0 could not choose a checkpoint to resume from: {choice.error}")
    return open_resume_checkpoint(choice, run_dir, latest, rank, stack, registered)


def _order(name: str) -> tuple[int, int]:
    return checkpoint_order(name) or (-1, -1)


def choose_resume_checkpoint(run_dir: Path, latest: RayCheckpoint | None, resume_from: str,
                             registered: "dict[str, RayCheckpoint] | None") -> ResumeChoice:
    """Rank 0's decision (reads storage, checks checksums). `registered`: the checkpoints
    Ray Train holds, by name (None in local mode, where Ray keeps no record and the loop
    prunes): every other checkpoint in the run's directory is marked unregistered, good or
    damaged (a worker or the driver died between its publish and Ray's registration), so
    that `prune_unregistered` removes it by the keep-K rule; Ray prunes only what it holds.
    With a bucket, where nothing is listed here, a damaged latest falls back to the newest
    intact older checkpoint Ray holds (each downloaded to be checked)."""
    listed = [ckpt.name for ckpt in checkpoints_newest_first(run_dir)]
    if registered is not None:
        for name in listed:
            if name not in registered:
                mark_unregistered(run_dir / name)
    on_disk = latest_good_checkpoint(run_dir)  # the newest intact one; damaged newer ones warned about
    if latest is None or (on_disk is not None and _order(on_disk.name) >= _order(latest.name)):
        # on disk: sealed after the last checkpoint Ray registered, or that one itself
        if on_disk is None:
            return _choose_resume_from(resume_from)
        _ignoring_resume_from(resume_from, on_disk.name)
        return ResumeChoice(on_disk.name, "run")
    _ignoring_resume_from(resume_from, latest.name)
    # Ray's latest is newer than every intact checkpoint listed here. Listed: checked
    # above, so torn or corrupt. Not listed: a bucket's download to this node (or a
    # listing that lags), checked now.
    reason = "torn or corrupt" if latest.name in listed else verify_checkpoint(latest.local_dir())
    if not reason:
        return ResumeChoice(latest.name, "run" if (run_dir / latest.name).is_dir() else "ray")
    if on_disk is None:
        older = sorted((c for name, c in (registered or {}).items() if _order(name) < _order(latest.name)
                        and not (run_dir / name).is_dir()), key=lambda c: _order(c.name), reverse=True)
        for ckpt in older:  # a bucket's: listed nowhere here, so downloaded and checked now
            probe = ExitStack()  # holds this candidate's download
            candidate = RayCheckpoint(ckpt.checkpoint, probe)
            why = verify_checkpoint(candidate.local_dir())
            if not why:
                ckpt.stack.push(probe)  # kept until the caller's stack closes, and opened from there
                registered[ckpt.name] = candidate
                log.warning("Ray Train's latest checkpoint %s is not usable (%s); resuming from %s, the newest "
                            "intact one it holds", latest.name, reason, ckpt.name)
                return ResumeChoice(ckpt.name, "ray")
            probe.close()  # a damaged one's download goes at once
            log.warning("Ray Train's checkpoint %s is not usable either (%s)", ckpt.name, why)
        raise RuntimeError(f"Ray Train's latest checkpoint {latest.name} is not usable ({reason}) and no older "
                           f"intact one is in {run_dir} or among the {len(older)} older ones Ray holds; resume from "
                           "a copy with --resume-from")
    log.warning("Ray Train's latest checkpoint %s is not usable (%s); resuming from %s", latest.name, reason,
                on_disk.name)
    return ResumeChoice(on_disk.name, "run")


def _ignoring_resume_from(resume_from: str, own: str) -> None:
    if resume_from:  # it seeds a run's start; restarts after that continue the run's own progress
        log.warning("the run has checkpoints of its own (%s): resuming from them, not from --resume-from %s "
                    "(which only starts a run that has none; pick a new --name to start from it again)",
                    own, resume_from)


def _choose_resume_from(resume_from: str) -> ResumeChoice:
    """--resume-from: a checkpoint (an older one beside it if it is damaged) or a run directory."""
    if not resume_from:
        return ResumeChoice(None)
    given = Path(resume_from)
    if (given / STATE_FILE).is_file():
        found = latest_good_checkpoint(given.parent, newest=given)
    else:
        found = latest_good_checkpoint(given)
    if found is None:
        raise FileNotFoundError(f"--resume-from {resume_from}: no intact checkpoint there")
    return ResumeChoice(found.name, "resume_from", str(found.parent))


def open_resume_checkpoint(choice: ResumeChoice, run_dir: Path, latest: RayCheckpoint | None,
                           rank: int, stack: ExitStack,
                           registered: "dict[str, RayCheckpoint] | None" = None) -> Path | None:
    """Collective: rank 0's choice opened under this worker's view of storage. If any
    worker cannot open it, every worker raises (one all-reduce: none is left waiting).
    `registered`: rank 0's checkpoints of Ray (their downloads reused); other ranks ask Ray."""
    if choice.name is None:  # the same on every rank: all skip the collective
        return None
    path, problem = None, ""
    if choice.source == "ray":
        try:  # a failure here must reach the all-reduce below, not leave the others waiting in it
            if latest is not None and latest.name == choice.name:
                path = latest.local_dir()
            elif (older := (registered if registered is not None else RayCheckpoint.registered(stack))
                  .get(choice.name)) is not None:  # past a damaged latest
                path = older.local_dir()
            else:
                problem = (f"rank {rank}: Ray Train holds no checkpoint {choice.name} for this worker, "
                           "the one rank 0 chose to resume from")
        except Exception as err:  # noqa: BLE001 - reported to every rank below
            problem = f"rank {rank} could not open Ray Train's checkpoint {choice.name}: {type(err).__name__}: {err}"
    else:
        base = run_dir if choice.source == "run" else Path(choice.directory)
        path = base / choice.name
        if not (path / STATE_FILE).is_file():
            what = ("the run's storage directory" if choice.source == "run" else "--resume-from's directory")
            problem = (f"rank {rank} cannot see {path / STATE_FILE}, the checkpoint rank 0 chose to resume from: "
                       f"{what} {base} on this node does not hold it. Likely cause: the storage is not "
                       "shared between nodes (a directory on each node's own disk); it must be one "
                       "directory every node mounts at the same path (e.g. NFS), or a bucket (s3://, gs://)")
    failed = all_reduce_max([rank + 1.0 if problem else 0.0])[0]
    if problem:
        raise FileNotFoundError(problem)
    if failed:
        raise RuntimeError(f"rank {int(failed) - 1} cannot open checkpoint {choice.name}, which rank 0 chose "
                           "to resume from (that rank's error says why); every worker stops")
    return path


def mark_unregistered(checkpoint: Path) -> None:
    """Record (on disk, so that later restarts know) that Ray never registered this sealed
    checkpoint (a worker died between its write and Ray's registration): Ray prunes only
    what it registered, so `prune_unregistered` will."""
    (checkpoint.parent / f"{UNREGISTERED}{checkpoint.name}").touch()


def prune_unregistered(run_dir: Path, keep: int) -> None:
    """Delete the checkpoints marked unregistered once `keep` newer ones are published."""
    orders = [checkpoint_order(p.name) for p in checkpoints_newest_first(run_dir)]
    for marker in run_dir.glob(f"{UNREGISTERED}*"):
        name = marker.name[len(UNREGISTERED):]
        order = checkpoint_order(name)
        if order is not None and sum(o > order for o in orders) >= keep:
            shutil.rmtree(run_dir / name, ignore_errors=True)
            marker.unlink(missing_ok=True)


def new_checkpoint_name(config: dict[str, Any], step: int, rank: int) -> str:
    """Collective: the name of the checkpoint of `step` about to be written, chosen by
    rank 0 from what is in storage: `step_N`, or `step_N-r1`, ... when `step_N` was
    published before (the run fell back past it); that one stays until pruned."""
    name = None
    if rank == 0:
        names, directory = names_in_storage(config)
        # A marker that outlived its checkpoint (a kill between the two deletions) still
        # takes its name: `prune_unregistered` would delete a new checkpoint of that name.
        names += [n[len(UNREGISTERED):] for n in names if n.startswith(UNREGISTERED)]
        name = unused_checkpoint_name(step, names)
        # A listing can lag (an NFS client caches them); a lookup by name asks the server.
        while directory is not None and (directory / name).exists():
            name = checkpoint_name(step, checkpoint_order(name)[1] + 1)
        if name != checkpoint_name(step):
            log.warning("step %d was checkpointed before (the run fell back past that checkpoint and redid the "
                        "steps since): writing %s; the earlier one stays in storage for inspection until "
                        "keep-checkpoints pruning removes it", step, name)
    return broadcast_from_rank0(name)


def names_in_storage(config: dict[str, Any]) -> tuple[list[str], Path | None]:
    """Names of everything in the run's storage directory (or bucket prefix), and that
    directory when it is one (None for a bucket)."""
    if config["local_mode"]:
        run_dir = Path(config["run_dir"])
        return ([p.name for p in run_dir.iterdir()] if run_dir.is_dir() else []), run_dir
    import pyarrow.fs
    import ray.train

    storage = ray.train.get_context().get_storage()
    infos = storage.storage_filesystem.get_file_info(
        pyarrow.fs.FileSelector(storage.experiment_fs_path, allow_not_found=True))
    local = isinstance(storage.storage_filesystem, pyarrow.fs.LocalFileSystem)
    return [Path(info.path).name for info in infos], Path(storage.experiment_fs_path) if local else None


def checkpoint_destination(config: dict[str, Any], name: str) -> tuple[Path, Any] | None:
    """(directory, pyarrow filesystem) of checkpoint `name` when the workers can write it
    there themselves: in local mode the run directory; else the run's directory in storage
    if that is a filesystem path (on a multi-node cluster Ray Train requires it to be
    shared storage such as NFS). None for a bucket (s3://, gs://, ...)."""
    import pyarrow.fs
    import ray.train

    if config["local_mode"]:
        return Path(config["run_dir"]) / name, pyarrow.fs.LocalFileSystem()
    storage = ray.train.get_context().get_storage()
    if not isinstance(storage.storage_filesystem, pyarrow.fs.LocalFileSystem):
        return None
    if not config.get("storage_checked") and hasattr(storage, "_check_validation_file"):
        # What Ray's upload checks on every worker (NO_UPLOAD skips it): the marker file
        # Ray's controller wrote in the run's storage directory is seen here, i.e. the
        # directory is shared storage and not one node's local disk; else Ray's error.
        storage._check_validation_file()
        config["storage_checked"] = True
    # Ray registers a NO_UPLOAD checkpoint only on its storage filesystem under its run
    # directory, and names it by that path spelled as Ray spells it.
    return Path(storage.build_checkpoint_path_from_name(name)), storage.storage_filesystem


def save_and_report(config: dict[str, Any], step: int, rank: int, keep: int, metrics: dict[str, Any],
                    write: Callable[[Path], None], written: Callable[[float], None] = lambda s: None) -> None:
    """Collective: checkpoint `step` and report it to Ray Train with `metrics`.
    `write(path)` writes and seals this worker's files under `path`. Where the storage is
    a directory the workers write straight into it (`write_in_place`) and Ray only
    registers the checkpoint (NO_UPLOAD): no copy on the node's disk, no copy time. With
    a bucket each worker writes to the node's temp dir and Ray uploads it. `written(s)`
    (collective) gets the write time, the upload included for a bucket."""
    import ray.train

    name = new_checkpoint_name(config, step, rank)
    t0 = time.perf_counter()
    destination = checkpoint_destination(config, name)
    if destination is None:  # a bucket: Ray uploads each worker's directory and merges them
        path = Path(tempfile.mkdtemp(prefix=f"{name}-"))
        write(path)
        checkpoint = ray.train.Checkpoint.from_directory(str(path))
        upload = ray.train.CheckpointUploadMode.SYNC
    else:
        path, filesystem = destination
        write_in_place(path, rank, write)
        if config["local_mode"]:  # else Ray's CheckpointConfig(num_to_keep) prunes, on registering
            prune_checkpoints(path.parent, keep)
        # The same checkpoint from every worker (Ray refuses reports of different paths)
        checkpoint = ray.train.Checkpoint(str(path), filesystem=filesystem)
        upload = ray.train.CheckpointUploadMode.NO_UPLOAD
        written(time.perf_counter() - t0)
    # A unique checkpoint_dir_name, as ray.train.report asks: Ray prunes a name it has
    # registered twice by deleting its one directory, the live checkpoint among them.
    ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name, checkpoint_upload_mode=upload)
    if destination is None:
        written(time.perf_counter() - t0)
        shutil.rmtree(path, ignore_errors=True)
    elif rank == 0 and not config["local_mode"]:
        prune_unregistered(path.parent, keep)
