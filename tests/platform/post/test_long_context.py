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
    _windows, evaluate_long_context, load_long_context, long_document_perplexity, rope_scaling_for,
    token_losses, tokenize_documents)
from mamba_slm.platform.post.loading import load_model_dir


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
    assert len({r["tokens"] for r in results["runs"]}) == 1
    assert "by position" in proc.stdout
    bad = subprocess.run([sys.executable, "jobs/evaluate_long.py", "--checkpoint", str(tmp_path),
                          "--text", str(text)], cwd=repo_root, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "not a model directory" in bad.stderr


def test_token_losses_in_chunks_match_full_logits(tiny_model_dir):
    model = load_model_dir(tiny_model_dir).model
    ids = torch.randint(0, model.config.vocab_size, (2, 50), generator=torch.Generator().manual_seed(0))
    head = model.lm_head
    with torch.no_grad():
        chunked = token_losses(model, ids, chunk_tokens=14)  # 7 positions per chunk: uneven last chunk
        logits = model(ids[:, :-1]).logits[..., :model.config.vocab_size]
    full = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
    assert chunked.shape == (2, 49) and torch.allclose(chunked, full, atol=1e-5)
    assert model.lm_head is head  # put back


def test_reference_scores_the_same_tokens(tiny_model_dir, long_text):
    """The reference reads each long window in trained-length pieces: the same targets as
    the long runs, whatever the document length (it used to cut its own windows)."""
    text = long_text[:8_000]  # ~2.5 windows of 1024: the old reference read 10 of 256 instead of 8
    results = evaluate_long_context(tiny_model_dir, [text], 1024, ["none", "yarn"])
    ref, plain, yarn = results["runs"]
    assert (ref["context"], plain["context"], yarn["context"]) == (256, 1024, 1024)
    assert ref["tokens"] == plain["tokens"] == yarn["tokens"] == 1024 * plain["windows"]
    loaded = load_model_dir(tiny_model_dir)
    windows = _windows(tokenize_documents(loaded.tokenizer, [text], loaded.eos_id), 1024)
    with torch.no_grad():
        losses = [token_losses(loaded.model, w[None, lo: lo + 257]) for w in windows for lo in range(0, 1024, 256)]
    assert ref["loss"] == pytest.approx(torch.cat(losses, 1).mean().item(), rel=1e-5)


def test_context_within_trained_runs_the_reference_once(tiny_model_dir, long_text, tmp_path, repo_root):
    text = tmp_path / "play.txt"
    text.write_text(long_text[:3_000])
    out = tmp_path / "long.json"
    proc = subprocess.run([sys.executable, "jobs/evaluate_long.py", "--checkpoint", str(tiny_model_dir),
                           "--text", str(text), "--context", "128", "--rope-scaling", "none", "yarn",
                           "--max-windows", "2", "--device", "cpu", "--output", str(out)],
                          cwd=repo_root, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("rope none") == 1 and "reference is the only run" in proc.stdout
    (run,) = json.loads(out.read_text())["runs"]
    assert run["context"] == 128 and run["rope_scaling"] == "none"
    bad = subprocess.run([sys.executable, "jobs/evaluate_long.py", "--checkpoint", str(tiny_model_dir),
                          "--text", str(text), "--device", "bogus"], cwd=repo_root, capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode == 2 and "--device: device 'bogus'" in bad.stderr and "Traceback" not in bad.stderr
