"""Checkpoint integrity: checksums, atomic publish, fallback to the last good checkpoint.

Every worker seals the files it wrote into a checkpoint with `integrity_rank{r}.json`
(size + sha256 per file, and the world size), written last. A checkpoint is *good* when
the manifests of all ranks are there and every listed file has its size and checksum.
That catches both failure modes of spot capacity:

- torn: the node died while the checkpoint was being written or uploaded (files or a
  manifest missing, a file short);
- corrupt: bytes changed afterwards (a bad disk, a truncated copy, a partial sync).

Publishing: where the storage is a filesystem path (local mode, or a directory every
worker reaches, e.g. NFS), the checkpoint is written under a hidden temporary name next
to its final one and renamed into place (`os.replace` is atomic on POSIX), so a reader
never sees half of it; a leftover temporary directory (a writer killed mid-save) is
never read, and is cleared before the run's next write. With a bucket (s3://,
gs://) the workers' directories are uploaded by Ray, which registers a checkpoint only
after the upload finished; the manifests make a torn or damaged upload detectable all
the same.

Names: `step_00000050`; a step checkpointed again (the run fell back past a damaged
checkpoint and redid the steps since) gets a fresh name, `step_00000050-r1`, `-r2`, ...
A published name is never reused: Ray Train registers checkpoints by name and prunes
them by path (`ray.train.report` asks for a unique `checkpoint_dir_name`), and a
publish never has to move an existing directory aside. Order is by (step, revision),
never by the string (`-r10` sorts before `-r2` as text).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import warnings
from collections.abc import Iterable
from pathlib import Path

log = logging.getLogger(__name__)
MANIFEST_PREFIX = "integrity_rank"
CHECKPOINT_PREFIX = "step_"
CHECKPOINT_GLOB = f"{CHECKPOINT_PREFIX}*"
CHECKPOINT_NAME = re.compile(rf"{CHECKPOINT_PREFIX}(\d+)(?:-r(\d+))?")
# Hidden siblings of a checkpoint: `.tmp-<name>-<pid>` is being written (or was, by a
# writer killed mid-save); `.old-<name>-<pid>` was moved aside by an earlier version of
# `publish_atomically` that replaced a published checkpoint (a kill there left it).
LEFTOVER_PREFIXES = (".tmp-", ".old-")


class CorruptCheckpointWarning(UserWarning):
    pass


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def manifest_name(rank: int) -> str:
    return f"{MANIFEST_PREFIX}{rank}.json"


def seal_checkpoint(path: str | Path, rank: int, world: int, step: int) -> Path:
    """Write this rank's manifest over every file it put under `path` (call last)."""
    path = Path(path)
    files = {}
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        rel = f.relative_to(path).as_posix()
        if rel.startswith(MANIFEST_PREFIX):
            continue
        files[rel] = {"size": f.stat().st_size, "sha256": sha256_file(f)}
    out = path / manifest_name(rank)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps({"rank": rank, "world": world, "step": step, "files": files}, indent=1))
    os.replace(tmp, out)
    return out


def verify_checkpoint(path: str | Path) -> str:
    """'' when the checkpoint is complete and intact, else why not."""
    path = Path(path)
    first = path / manifest_name(0)
    if not first.is_file():
        return f"no {first.name} (torn: the write or upload did not finish)"
    try:
        world = int(json.loads(first.read_text())["world"])
        for rank in range(world):
            m = path / manifest_name(rank)
            if not m.is_file():
                return f"no {m.name} (torn: rank {rank} of {world} never finished)"
            for rel, meta in json.loads(m.read_text())["files"].items():
                f = path / rel
                if not f.is_file():
                    return f"{rel} is missing"
                if f.stat().st_size != meta["size"]:
                    return f"{rel} has {f.stat().st_size} bytes, the manifest says {meta['size']}"
                if sha256_file(f) != meta["sha256"]:
                    return f"{rel} does not match its sha256"
    except (ValueError, KeyError, TypeError) as e:  # the manifest itself is damaged
        return f"unreadable manifest: {e!r}"
    return ""


def checkpoint_name(step: int, revision: int = 0) -> str:
    """`step_00000050`, or `step_00000050-r<revision>` for a step checkpointed again."""
    return f"{CHECKPOINT_PREFIX}{step:08d}" + (f"-r{revision}" if revision else "")


def checkpoint_order(name: str) -> tuple[int, int] | None:
    """(step, revision) of a checkpoint's directory name, None for any other name."""
    m = CHECKPOINT_NAME.fullmatch(name)
    return (int(m[1]), int(m[2] or 0)) if m else None


def unused_checkpoint_name(step: int, existing: Iterable[str]) -> str:
    """The name for a new checkpoint of `step`, given the names already in storage:
    `step_N` the first time, else one revision past the newest of that step (not just
    any free one: the new checkpoint must sort after every earlier one of its step,
    even where pruning removed `step_N` and kept `step_N-r1`)."""
    revisions = [order[1] for order in map(checkpoint_order, existing) if order and order[0] == step]
    return checkpoint_name(step, max(revisions) + 1 if revisions else 0)


def checkpoints_newest_first(run_dir: str | Path) -> list[Path]:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    ckpts = (p for p in run_dir.glob(CHECKPOINT_GLOB) if p.is_dir() and checkpoint_order(p.name))
    return sorted(ckpts, key=lambda p: checkpoint_order(p.name), reverse=True)


def latest_good_checkpoint(run_dir: str | Path, newest: str | Path | None = None) -> Path | None:
    """The newest intact checkpoint under `run_dir` (no newer than `newest` when given,
    e.g. the one Ray Train picked); every bad one skipped is reported with a warning."""
    candidates = checkpoints_newest_first(run_dir)
    if newest is not None:
        newest = Path(newest)
        below = checkpoint_order(newest.name)
        candidates = [newest] + ([c for c in candidates if checkpoint_order(c.name) < below] if below else [])
    for ckpt in candidates:
        reason = verify_checkpoint(ckpt)
        if not reason:
            return ckpt
        msg = f"checkpoint {ckpt} is not usable ({reason}); falling back to the previous one"
        log.warning(msg)
        warnings.warn(msg, CorruptCheckpointWarning, stacklevel=2)
    return None


def publish_atomically(tmp_dir: str | Path, final_dir: str | Path) -> Path:
    """Move a finished checkpoint from its temporary name to its final one in one rename.
    `final_dir` must be a new name (`unused_checkpoint_name`): a published checkpoint is
    never replaced, so the step is never absent between two renames."""
    tmp_dir, final_dir = Path(tmp_dir), Path(final_dir)
    if final_dir.exists():
        raise FileExistsError(f"{final_dir} is already published; a checkpoint is written under a new "
                              "name (unused_checkpoint_name), never over another one")
    os.replace(tmp_dir, final_dir)
    return final_dir


def temporary_dir_for(final_dir: str | Path) -> Path:
    """Hidden (not matched by `CHECKPOINT_GLOB`), so resume and pruning never see it."""
    final_dir = Path(final_dir)
    return final_dir.with_name(f".tmp-{final_dir.name}-{os.getpid()}")


def fresh_temporary_dir(final_dir: str | Path) -> Path:
    """`temporary_dir_for(final_dir)`, created empty, once the hidden checkpoint
    directories left in the run's directory by writers killed mid-save (`.tmp-*`, and
    `.old-*` from a kill inside an older `publish_atomically`) are removed: one
    checkpoint is written at a time, so none of them is being written, and one left at a
    step never written again would otherwise stay forever."""
    final_dir = Path(final_dir)
    for prefix in LEFTOVER_PREFIXES:
        for stale in final_dir.parent.glob(f"{prefix}{CHECKPOINT_GLOB}-*"):
            log.warning("removing %s, left by a checkpoint writer that was killed", stale)
            shutil.rmtree(stale, ignore_errors=True)
    tmp = temporary_dir_for(final_dir)
    tmp.mkdir(parents=True)
    return tmp


def move_files(src: str | Path, dest: str | Path) -> None:
    """Move every file under `src` to the same relative path under `dest` (renames on one
    filesystem, no copy), then remove `src`. Several workers may fill one `dest` at once."""
    src, dest = Path(src), Path(dest)
    for f in sorted(p for p in src.rglob("*") if p.is_file()):
        target = dest / f.relative_to(src)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(f, target)
    shutil.rmtree(src)


def prune_checkpoints(run_dir: str | Path, keep: int) -> list[Path]:
    """Delete all but the newest `keep` checkpoints; the newest good one is always kept
    (a corrupt newest one must not push the last usable one out)."""
    ckpts = checkpoints_newest_first(run_dir)
    keep_set = set(ckpts[:keep])
    good = latest_good_checkpoint_quiet(ckpts)
    if good is not None:
        keep_set.add(good)
    removed = [c for c in ckpts if c not in keep_set]
    for c in removed:
        shutil.rmtree(c, ignore_errors=True)
    return removed


def latest_good_checkpoint_quiet(ckpts: list[Path]) -> Path | None:
    return next((c for c in ckpts if not verify_checkpoint(c)), None)
