"""Weight-only INT8/INT4: kernels agree with the dequantized weights, the saved directory
round-trips, and the model's loss moves little."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from mamba_slm.model.io import load_pretrained
from mamba_slm.platform.post.quantize import (
    Int4Linear, Int8Linear, QuantConfig, load_quantized, quantize_model, save_quantized, weights_nbytes)


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_linear_matches_dequantized_weights(bits):
    torch.manual_seed(0)
    lin = nn.Linear(64, 296, bias=True)  # 296 = tiny in_proj width, not a multiple of 16
    q = Int8Linear.from_linear(lin) if bits == 8 else Int4Linear.from_linear(lin, 32)
    x = torch.randn(2, 5, 64)
    expected = x.bfloat16().float() @ q.dequantized().t() + lin.bias
    got = q(x)
    assert got.shape == (2, 5, 296) and got.dtype == torch.float32
    torch.testing.assert_close(got, expected, atol=2e-2, rtol=2e-2)
    # Quantization error itself: half a step per weight (+1% for the bf16-rounded scale
    # at the clamped ends of the range).
    step = (q.scale.float() if bits == 8 else q.scale.float().repeat_interleave(32, 1)[:296])
    err = (q.dequantized() - lin.weight).abs()
    assert bool((err <= step.reshape(296, -1) * 0.51 + 1e-6).all())


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_model_round_trip_and_loss(tiny_model_dir, tmp_path, bits, repo_root):
    model = load_pretrained(tiny_model_dir)
    ids = torch.randint(0, model.config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids[:, :-1], labels=ids[:, 1:])
    fp32_bytes = weights_nbytes(model)
    qmodel = quantize_model(model, QuantConfig(bits=bits, group_size=32))
    assert not any(type(m) is nn.Linear for n, m in qmodel.named_modules() if n.startswith("layers."))
    assert weights_nbytes(qmodel) < fp32_bytes
    out = save_quantized(qmodel, tmp_path / f"int{bits}", QuantConfig(bits=bits, group_size=32),
                         tokenizer_file=tiny_model_dir / "tokenizer.json")
    loaded = load_quantized(out)
    # 64-byte aligned, as the int8 CPU kernel's aligned loads need (not the file's mapping)
    assert all(b.data_ptr() % 64 == 0 for b in loaded.buffers() if b.numel()), "a buffer not 64-byte aligned"
    with torch.no_grad():
        got = loaded(ids[:, :-1], labels=ids[:, 1:])
        again = qmodel(ids[:, :-1], labels=ids[:, 1:])
    torch.testing.assert_close(got.logits, again.logits)
    # A random tiny model: logits move by bf16 + quantization noise, the loss barely.
    assert abs(got.loss.item() - ref.loss.item()) < (0.01 if bits == 8 else 0.05)
    assert (got.logits - ref.logits).abs().max() < (0.05 if bits == 8 else 0.2)
    with pytest.raises(ValueError, match="is a quantized model directory .*load_model"):
        load_pretrained(out)  # the float loader names the loaders that open it
    # the loaders of the jobs (generate, evaluate) open it as it was saved
    from mamba_slm.platform.evaluate.checkpoint import load_checkpoint
    from mamba_slm.platform.train.checkpoint import load_model

    for opened in (load_model(out), load_checkpoint(out).model):
        with torch.no_grad():
            torch.testing.assert_close(opened(ids[:, :-1]).logits, got.logits, rtol=0, atol=0)
    if bits == 4:
        with pytest.raises(ValueError, match="INT4 model, which runs on a CPU only"):
            load_model(out, device="cuda")
    else:  # the jobs that need the float model say so (exit 2), not a traceback from deep inside
        import subprocess
        import sys

        for job, args, needle in (
                ("export_hf.py", ["--output", str(tmp_path / "hf")], "quantized model (jobs/quantize.py), which Bamba"),
                ("finetune.py", ["--data", str(tmp_path / "c.jsonl"), "--output", str(tmp_path / "sft")],
                 "is quantized (jobs/quantize.py): fine-tune the float model")):
            proc = subprocess.run([sys.executable, f"jobs/{job}", "--checkpoint", str(out), *args], cwd=repo_root,
                                  capture_output=True, text=True, timeout=120)
            assert proc.returncode == 2 and needle in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]


def test_quant_config_rejects_bad_values():
    with pytest.raises(ValueError, match="bits"):
        QuantConfig(bits=3)
    with pytest.raises(ValueError, match="group_size"):
        QuantConfig(bits=4, group_size=48)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_int8_on_a_gpu_decodes_like_the_dequantized_model():
    """On a GPU, a one-row INT8 product is the compiled GEMV (`int8_gemv`), a longer one
    the bf16 product; both match the dequantized weights, and batch-1 decoding with CUDA
    graphs gives the tokens of eager decoding."""
    from mamba_slm.model import HybridLM, ModelConfig

    torch.manual_seed(0)
    lin = nn.Linear(256, 296, bias=False).cuda()
    q = Int8Linear.from_linear(lin)
    for rows in (1, 7):
        x = torch.randn(rows, 256, device="cuda")
        with torch.no_grad():
            got = q(x)
        want = x.bfloat16().float() @ q.dequantized().t()
        torch.testing.assert_close(got, want, atol=3e-2, rtol=3e-2)
    model = HybridLM(ModelConfig.from_name("tiny", layer_pattern="AMMA")).cuda().bfloat16()
    qmodel = quantize_model(model, QuantConfig(bits=8))
    prompt = torch.randint(0, 4000, (1, 13), device="cuda")
    eager = qmodel.generate(prompt, max_new_tokens=24, temperature=0, cuda_graphs=False)
    graph = qmodel.generate(prompt, max_new_tokens=24, temperature=0, cuda_graphs=True)
    assert torch.equal(graph, eager)


def test_int8_projections_pack_for_decoding():
    """pack_for_decoding stacks INT8 q|k|v and gate|up into one INT8 product each (the
    members' buffers become views: no extra memory), with the unpacked model's outputs."""
    from mamba_slm.model import HybridLM, ModelConfig

    torch.manual_seed(0)
    model = quantize_model(HybridLM(ModelConfig.from_name("tiny", layer_pattern="AMMA")), QuantConfig(bits=8))
    ids = torch.randint(0, 4000, (1, 9))
    with torch.no_grad():
        want_logits = model(ids).logits
        want = model.generate(ids, max_new_tokens=12, temperature=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    nbytes = weights_nbytes(model)
    model.pack_for_decoding()
    attn, mlp = model.layers[0].mixer, model.layers[0].feed_forward
    assert isinstance(attn.qkv.module, Int8Linear) and isinstance(mlp.gate_up.module, Int8Linear)
    assert attn.q_proj.weight.data_ptr() == attn.qkv.module.weight.data_ptr()
    assert weights_nbytes(model) == nbytes and model.state_dict().keys() == before.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    with torch.no_grad():
        assert mlp.gate_up.packed() is not None
        torch.testing.assert_close(model(ids).logits, want_logits, atol=1e-4, rtol=1e-4)
        assert torch.equal(model.generate(ids, max_new_tokens=12, temperature=0), want)
        mlp.gate_proj.scale = mlp.gate_proj.scale * 2  # a member's scale replaced: the packing lapses
        assert mlp.gate_up.packed() is None and mlp.gate_up(ids.float()) is None


def test_quantize_job_output_that_is_a_file_is_exit_2(tiny_model_dir, tmp_path, capsys):
    """--output naming an existing file: exit 2 with the way out, the file untouched (it was
    a NotADirectoryError traceback)."""
    spec = importlib.util.spec_from_file_location("quantize_job", Path(__file__).parents[3] / "jobs" / "quantize.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    out = tmp_path / "notes.txt"
    out.write_text("keep me")
    with pytest.raises(SystemExit) as exc:
        job.main(["--checkpoint", str(tiny_model_dir), "--output", str(out)])
    assert exc.value.code == 2
    assert "notes.txt is a file, not a directory: pass a new directory" in capsys.readouterr().err
    assert out.read_text() == "keep me"
