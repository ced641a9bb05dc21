"""A run's checkpoints in its storage (a directory every worker reaches, or a bucket):
the name and place of the next one, and the pruning Ray Train does not do. The training
loop calls `save_and_report` at every checkpoint.

Names are never reused (`integrity.unused_checkpoint_name`): a step checkpointed again
after a fallback past a damaged checkpoint is written as `step_N-r1`, and the damaged
`step_N` stays for inspection until keep-K pruning removes it.
"""
from __future__ import annotations

import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from mamba_slm.platform.fault.integrity import (checkpoint_name, checkpoint_order, checkpoints_newest_first,
                                                prune_checkpoints, unused_checkpoint_name)
from mamba_slm.platform.fault.worker import broadcast_from_rank0

from .checkpoint import write_in_place

log = logging.getLogger(__name__)
UNREGISTERED = ".unregistered-"  # + a checkpoint's name: a marker file in the run's directory


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
        name = unused_checkpoint_name(step, checkpoint_names_in_storage(config))
        if name != checkpoint_name(step):
            log.warning("step %d was checkpointed before (the run fell back past that checkpoint and redid the "
                        "steps since): writing %s; the earlier one stays in storage for inspection until "
                        "keep-checkpoints pruning removes it", step, name)
    return broadcast_from_rank0(name)


def checkpoint_names_in_storage(config: dict[str, Any]) -> list[str]:
    """Names of everything in the run's storage directory (or bucket prefix)."""
    if config["local_mode"]:
        run_dir = Path(config["run_dir"])
        return [p.name for p in run_dir.iterdir()] if run_dir.is_dir() else []
    import pyarrow.fs
    import ray.train

    storage = ray.train.get_context().get_storage()
    infos = storage.storage_filesystem.get_file_info(
        pyarrow.fs.FileSelector(storage.experiment_fs_path, allow_not_found=True))
    return [Path(info.path).name for info in infos]


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
