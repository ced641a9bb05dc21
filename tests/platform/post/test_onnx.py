"""ONNX export: onnxruntime reproduces PyTorch's logits for several batch sizes and
lengths (one attention and one Mamba-2 layer; export time grows with depth)."""
from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mamba_slm.model import HybridLM, ModelConfig
from mamba_slm.model.io import save_pretrained
from mamba_slm.platform.post.onnx_export import OnnxLM, export_onnx, max_logit_diff


@pytest.fixture(scope="module")
def two_layer_dir(tiny_model_dir, tmp_path_factory):
    torch.manual_seed(0)
    cfg = ModelConfig.from_name("tiny", vocab_size=512, n_layers=2, layer_pattern="MA", ssm_path="reference",
                                rope_scaling={"type": "yarn", "factor": 2.0})
    path = tmp_path_factory.mktemp("onnx") / "model"
    save_pretrained(HybridLM(cfg), path, tokenizer_file=tiny_model_dir / "tokenizer.json", metadata={"eos_id": 0})
    return path


@pytest.mark.slow
def test_export_job_matches_pytorch(two_layer_dir, tmp_path, repo_root):
    out = tmp_path / "onnx" / "model.onnx"
    proc = subprocess.run([sys.executable, "jobs/export_onnx.py", "--checkpoint", str(two_layer_dir),
                           "--output", str(out), "--max-chunks", "16"],
                          cwd=repo_root, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "max |logit diff|" in proc.stdout and (out.parent / "tokenizer.json").is_file()

    from mamba_slm.model.io import load_pretrained

    model = load_pretrained(two_layer_dir)
    onnx_model = OnnxLM(out, chunk_size=32)
    # Dynamic length, batches run row by row, a length that needs padding, and the padding
    # is invisible.
    assert max_logit_diff(model, onnx_model, [(1, 32), (3, 96), (2, 45), (1, 512)]) < 1e-4
    ids = np.random.default_rng(0).integers(0, 512, (1, 40))
    np.testing.assert_allclose(onnx_model.logits(ids)[:, :33], onnx_model.logits(ids[:, :33]), atol=1e-5)
    assert onnx_model.fixed_batch and onnx_model.logits(ids).shape == (1, 40, 512)


def test_export_refuses_quantized(tiny_model_dir, tmp_path):
    from mamba_slm.model.io import load_pretrained
    from mamba_slm.platform.post.quantize import QuantConfig, quantize_model

    model = quantize_model(load_pretrained(tiny_model_dir), QuantConfig(bits=8))
    with pytest.raises(ValueError, match="quantized"):
        export_onnx(model, tmp_path / "q.onnx")


def load_job(name: str):
    spec = importlib.util.spec_from_file_location(f"{name}_job", Path(__file__).parents[3] / "jobs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_job(job, argv: list[str], capsys) -> tuple[int, str]:
    try:
        code = job.main(argv)
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().err


@pytest.mark.parametrize("existing, needle", [
    ("model.onnx", "model.onnx exists; remove it or choose another path"),
    ("model.onnx.data", "model.onnx.data exists; remove it or choose another path"),  # external weights
    ("tokenizer.json", "tokenizer.json exists and differs from"),
])
def test_export_job_overwrites_nothing(tiny_model_dir, tmp_path, capsys, existing, needle):
    """An existing file in the way is exit 2 before the export, and is left as it was."""
    (tmp_path / existing).write_text("keep me")
    code, err = run_job(load_job("export_onnx"),
                        ["--checkpoint", str(tiny_model_dir), "--output", str(tmp_path / "model.onnx")], capsys)
    assert code == 2 and needle in err, err
    assert (tmp_path / existing).read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == [existing]


def test_export_job_into_the_model_directory(tiny_model_dir, tmp_path, capsys, monkeypatch):
    """--output beside the model's own tokenizer.json: the export lands and the tokenizer is
    left in place (copying it onto itself was a SameFileError after the export). The export
    itself is stubbed: the copy after it is under test (test_export_job_matches_pytorch
    runs the real one)."""
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    tokenizer = (model_dir / "tokenizer.json").read_bytes()
    job = load_job("export_onnx")
    monkeypatch.setattr(job, "export_onnx", lambda model, path, **kwargs: Path(path).write_bytes(b"graph"))
    code, err = run_job(job, ["--checkpoint", str(model_dir), "--output", str(model_dir / "model.onnx"), "--no-check"],
                        capsys)
    assert code == 0, err
    assert (model_dir / "model.onnx").read_bytes() == b"graph"
    assert (model_dir / "tokenizer.json").read_bytes() == tokenizer
