"""platform/extras.py: its table matches pyproject.toml's extras, and each job that needs an
extra stops with exit code 2 and the install command when the extra is missing (run as a
script with the extra's module made unimportable), instead of a traceback."""
from __future__ import annotations

import re
import subprocess
import sys

import pytest

from mamba_slm.platform.extras import EXTRAS, missing_extra

# jobs/<script> args, the module hidden, the extra the message must name
CASES = [
    ("evaluate.py", ["--checkpoint", "{tmp}", "--benchmarks", "local"], "lm_eval", "eval"),
    ("export_onnx.py", ["--checkpoint", "{tmp}", "--output", "{tmp}/m.onnx"], "onnxscript", "post"),
    ("export_onnx.py", ["--checkpoint", "{tmp}", "--output", "{tmp}/m.onnx"], "onnxruntime", "post"),
    ("serve.py", ["--checkpoint", "{tmp}"], "uvicorn", "post"),
    ("finetune.py", ["--checkpoint", "{tmp}", "--data", "{tmp}/chat.jsonl", "--output", "{tmp}/out"], "peft", "post"),
    ("launch.py", ["--name", "x", "--image", "img:1", "--storage-path", "s3://b/runs", "--volume", "d:/data"],
     "kubernetes", "cluster"),
    ("tune_sweep.py", ["--searcher", "optuna", "--output-dir", "{tmp}/sweep", "--data-path", "{data}",
                       "--gpus-per-trial", "0"], "optuna", "tune"),
]

HIDE = """import runpy, sys
sys.modules[{mod!r}] = None  # import fails; importlib.util.find_spec gives None
sys.argv = {argv!r}
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def run_without(repo_root, script: str, args: list[str], module: str):
    argv = [str(repo_root / "jobs" / script), *args]
    return subprocess.run([sys.executable, "-c", HIDE.format(mod=module, argv=argv)], cwd=repo_root,
                          capture_output=True, text=True, timeout=300)


def test_extras_table_matches_pyproject(repo_root):
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    declared = tomllib.loads((repo_root / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for extra, modules in EXTRAS.items():
        assert extra in declared, f"[{extra}] is not an extra of pyproject.toml"
        dists = {re.split(r"[<>=!~\[ ;]", req, maxsplit=1)[0].lower().replace("-", "_") for req in declared[extra]}
        assert dists == set(modules), f"[{extra}]: pyproject installs {sorted(dists)}, the table has {modules}"
    assert set(declared) - set(EXTRAS) == {"gpu", "dev"}  # gpu: the model's own fallback; dev: tests


def test_missing_extra_names_the_extra_and_the_install(monkeypatch):
    import importlib.util

    assert missing_extra("post", ("peft",), what="x") is None  # the test environment has every extra
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "uvicorn" else real(name, *a))
    msg = missing_extra("post", ("fastapi", "uvicorn"), what="serving")
    assert msg.startswith("serving needs uvicorn, from the optional [post] extra")
    assert "pip install -e '.[post]'" in msg and "pip install 'mamba-slm[post]'" in msg
    with pytest.raises(ValueError, match="not modules of the \\[eval\\] extra"):
        missing_extra("eval", ("peft",), what="x")


@pytest.mark.parametrize("script,args,module,extra", CASES, ids=[f"{c[0]}-{c[2]}" for c in CASES])
def test_job_without_its_extra_exits_2_with_the_install_command(repo_root, tmp_path, script, args, module, extra):
    (tmp_path / "chat.jsonl").write_text("")
    data = tmp_path / "data"
    data.mkdir()
    (data / "manifest.json").write_text("{}")
    args = [a.format(tmp=tmp_path, data=data) for a in args]
    proc = run_without(repo_root, script, args, module)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert module in proc.stderr and f"pip install -e '.[{extra}]'" in proc.stderr, proc.stderr[-2000:]


def test_launch_dry_run_needs_no_kubernetes(repo_root, tmp_path):
    proc = run_without(repo_root, "launch.py", ["--name", "x", "--image", "img:1", "--storage-path", "s3://b/runs",
                                                "--volume", "d:/data",
                                                "--dry-run", "--out-dir", str(tmp_path)], "kubernetes")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert list(tmp_path.glob("*.yaml")), proc.stdout
