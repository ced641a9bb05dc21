"""Long context: a model trained at 256 tokens runs at 4x with RoPE scaling, both mixer
kinds see the long input, and perplexity on long documents is reported per position."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from mamba_slm.model.layers import rope_inv_freq
from mamba_slm.platform.post.long_context import (
    load_long_context, long_document_perplexity, rope_scaling_for, tokenize_documents)


def test_rope_scaling_for():
    assert rope_scaling_for(8192, 32768, "yarn") == {"type": "yarn", "factor": 4.0}
    assert rope_scaling_for(8192, 8192, "linear") is None
    assert rope_scaling_for(8192, 32768, "none") is None
    with pytest.raises(ValueError, match="expected one of"):
        rope_scaling_for(8192, 32768, "dynamic")


@pytest.mark.parametrize("kind", ["linear", "ntk", "yarn"])
def test_attention_and_mamba_accept_4x_context(tiny_model_dir, kind):
    loaded = load_long_context(tiny_model_dir, 1024, kind)
    model, cfg = loaded.model, loaded.model.config
    assert cfg.rope_scaling == {"type": kind, "factor": 4.0} and cfg.max_seq_len == 256
    attn = model.layers[cfg.attn_layer_indices[0]].mixer
    plain = rope_inv_freq(attn.rotary.rotary_dim, cfg.rope_theta, None, 256)
    assert not torch.allclose(attn.rotary.inv_freq, plain)  # the scaling reached the layer
    seen = {}

    def record(i):
        def hook(module, args, out):
            seen[i] = (args[0].shape, out.shape)
        return hook

    for i, block in enumerate(model.layers):
        block.mixer.register_forward_hook(record(i))
    ids = torch.randint(0, cfg.vocab_size, (1, 1024))
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, 1024, cfg.padded_vocab_size) and torch.isfinite(logits).all()
    assert set(cfg.layer_pattern) == {"A", "M"}
    assert all(seen[i][0][1] == 1024 and seen[i][1][1] == 1024 for i in range(cfg.n_layers))


def test_long_document_perplexity_by_position(tiny_model_dir, long_text):
    loaded = load_long_context(tiny_model_dir, 1024, "yarn")
    docs = tokenize_documents(loaded.tokenizer, [long_text], loaded.eos_id)
    result = long_document_perplexity(loaded.model, docs, 1024, max_windows=2)
    assert result["windows"] == 2 and result["tokens"] == 2048
    assert [(b["start"], b["end"]) for b in result["by_position"]] == [(0, 256), (256, 512), (512, 768), (768, 1024)]
    assert math.isclose(result["loss"], sum(b["loss"] for b in result["by_position"]) / 4, rel_tol=1e-6)
    # A random model: close to uniform over the 512-token vocabulary.
    assert 100 < result["ppl"] < 2000
    with pytest.raises(ValueError, match="no document"):
        long_document_perplexity(loaded.model, [docs[0][:100]], 1024)


def test_evaluate_long_cli(tiny_model_dir, long_text, tmp_path, repo_root):
    text = tmp_path / "play.txt"
    text.write_text(long_text[:12_000])
    out = tmp_path / "long.json"
    proc = subprocess.run([sys.executable, "jobs/evaluate_long.py", "--checkpoint", str(tiny_model_dir),
                           "--text", str(text), "--rope-scaling", "none", "ntk", "--max-windows", "1",
                           "--output", str(out)], cwd=repo_root, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    results = json.loads(out.read_text())
    assert [r["context"] for r in results["runs"]] == [256, 1024, 1024]
    assert results["runs"][2]["rope_scaling"] == {"type": "ntk", "factor": 4.0}
    assert "by position" in proc.stdout
    bad = subprocess.run([sys.executable, "jobs/evaluate_long.py", "--checkpoint", str(tmp_path),
                          "--text", str(text)], cwd=repo_root, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "not a model directory" in bad.stderr
