"""ONNX export: onnxruntime reproduces PyTorch's logits for several batch sizes and
lengths (one attention and one Mamba-2 layer; export time grows with depth)."""
from __future__ import annotations

import subprocess
import sys

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
