"""The project's own lm-eval tasks (platform/evaluate/tasks/*.yaml + data/*.jsonl).

lm-eval resolves `data_files` against the working directory, not the YAML, so the
shipped YAMLs name their data relative to their own folder and `materialize` writes
copies with absolute paths into a folder given to `TaskManager(include_path=...)`.
They run with no network: multiple choice (acc), perplexity (loglikelihood_rolling) and
generation (generate_until, exact match) over 68 one-line facts — smoke tests of the
evaluation path, not a measure of model quality.
"""
from __future__ import annotations

from pathlib import Path

import yaml

TASKS_DIR = Path(__file__).resolve().parent / "tasks"


def task_files() -> list[Path]:
    return sorted(TASKS_DIR.glob("*.yaml"))


def local_task_names() -> list[str]:
    return [yaml.safe_load(p.read_text())["task"] for p in task_files()]


def materialize(dest: str | Path) -> Path:
    """Write the local task YAMLs into `dest` with absolute data paths; returns `dest`."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    for path in task_files():
        config = yaml.safe_load(path.read_text())
        files = config["dataset_kwargs"]["data_files"]
        for split, rel in files.items():
            data = (TASKS_DIR / rel).resolve()
            if not data.is_file():
                raise FileNotFoundError(f"{path.name}: data file {data} is missing")
            files[split] = str(data)
        (dest / path.name).write_text(yaml.safe_dump(config, sort_keys=False))
    return dest

