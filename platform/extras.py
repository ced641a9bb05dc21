"""The optional extras of pyproject.toml and a clear stop when a job needs one that is not
installed.

`make demo` and `pip install -e .` install the core only; evaluation (lm-eval), sweeps with
Optuna, KubeRay launches, LoRA / ONNX / serving and float8 each come with an extra. A job
asks `missing_extra` before it imports one, so a user sees the one command that fixes it
instead of a ModuleNotFoundError traceback from deep inside an import.
"""
from __future__ import annotations

import importlib.util
from collections.abc import Iterable

# extra -> the modules it brings that this project imports (pyproject.toml names the
# distributions; tests/platform/test_extras.py keeps the two in step)
EXTRAS: dict[str, tuple[str, ...]] = {
    "eval": ("lm_eval",),
    "tune": ("optuna",),
    "cluster": ("kubernetes",),
    "post": ("peft", "onnx", "onnxscript", "onnxruntime", "fastapi", "uvicorn"),
    "float8": ("torchao",),
}


def missing_extra(extra: str, modules: Iterable[str] | None = None, *, what: str) -> str | None:
    """None when `modules` (default: all of `extra`'s) import here, else a message saying
    that `what` needs them and how to install them."""
    wanted = tuple(modules) if modules is not None else EXTRAS[extra]
    unknown = set(wanted) - set(EXTRAS[extra])
    if unknown:
        raise ValueError(f"{sorted(unknown)} are not modules of the [{extra}] extra ({EXTRAS[extra]})")
    absent = [m for m in wanted if importlib.util.find_spec(m) is None]
    if not absent:
        return None
    return (f"{what} needs {', '.join(absent)}, from the optional [{extra}] extra, which is not "
            f"installed here: pip install -e '.[{extra}]' (in a checkout of mamba-slm) "
            f"or pip install 'mamba-slm[{extra}]'")
