"""model/fused_decode.py: each fused GEMV against PyTorch, and the whole batch-1 step
against the model's own layer-by-layer step. On a GPU (bf16, against the kernel path, with
PDL on sm90+), or on the CPU under Triton's interpreter (`TRITON_INTERPRET=1` with triton
installed; fp32, against the pure-PyTorch reference path); skipped otherwise."""
import os

import pytest
import torch
import torch.nn.functional as F

from mamba_slm.model import HybridLM, ModelConfig, fused_decode, generation
from mamba_slm.model.layers import GatedRMSNorm, RMSNorm

if torch.cuda.is_available() and fused_decode.triton is not None:
    DEVICE = "cuda"
elif fused_decode.triton is not None and os.environ.get("TRITON_INTERPRET") == "1":
    DEVICE = "cpu"
else:
    DEVICE = None
pytestmark = pytest.mark.skipif(DEVICE is None, reason="needs triton: a GPU, or TRITON_INTERPRET=1 on the CPU")
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32
TOL = dict(atol=2e-2, rtol=2e-2) if DTYPE == torch.bfloat16 else dict(atol=1e-4, rtol=1e-4)


def _rms(v, group, eps, weight):
    g = v.unflatten(-1, (-1, group))
    return (g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + eps)).flatten(-2) * weight.float()


@pytest.mark.parametrize("N,K", [(96, 64), (100, 80)])  # K off the tile size: masked tails
def test_gemv_prologues_match_pytorch(N, K):
    torch.manual_seed(0)
    pdl = fused_decode.pdl_supported(torch.device(DEVICE))
    w = torch.randn(N, K, device=DEVICE).to(DTYPE)
    x, res, z = (torch.randn(1, K, device=DEVICE).to(DTYPE) for _ in range(3))
    norm, gated = RMSNorm(K).to(DEVICE), GatedRMSNorm(K, group_size=K // 2 if K % 32 == 0 else K).to(DEVICE)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        gated.weight.uniform_(0.5, 1.5)
    wf = w.float()
    cases = {
        fused_decode.PLAIN: (x, None, None, x.float()),
        fused_decode.RMSNORM: (x, None, norm, _rms(x.float(), K, norm.eps, norm.weight).to(DTYPE).float()),
        fused_decode.ADD_RMSNORM: (x, res, norm, _rms(x.float() + res.float(), K, norm.eps, norm.weight).to(DTYPE).float()),
        fused_decode.GATED_RMSNORM: (x, z, gated, _rms(x.float() * F.silu(z.float()), gated.group_size, gated.eps,
                                                       gated.weight).to(DTYPE).float()),
    }
    for prologue, (inp, aux, nrm, want_in) in cases.items():
        out, summed = fused_decode.gemv(inp, w, prologue, aux, nrm, pdl=pdl)
        torch.testing.assert_close(out.float(), want_in @ wf.T, **TOL, msg=lambda m, p=prologue: f"prologue {p}: {m}")
        if prologue == fused_decode.ADD_RMSNORM:
            torch.testing.assert_close(summed, (x.float() + res.float()).to(DTYPE))
    gate_up = torch.randn(1, 2 * K, device=DEVICE).to(DTYPE)
    g, u = gate_up.float().chunk(2, -1)
    out, _ = fused_decode.gemv(gate_up, w, fused_decode.SILU_MUL, pdl=pdl)
    torch.testing.assert_close(out.float(), (F.silu(g) * u).to(DTYPE).float() @ wf.T, **TOL)


def _model():
    torch.manual_seed(0)
    cfg = ModelConfig.from_name("tiny", layer_pattern="MAMM", vocab_size=512,
                                ssm_path="kernel" if DEVICE == "cuda" else "reference")
    model = HybridLM(cfg).to(DEVICE).to(DTYPE).eval()
    with torch.no_grad():  # non-trivial norms, conv bias and D so that each term shows
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
                p.uniform_(0.5, 1.5)
            elif name.endswith("conv1d.bias") or name.endswith(".D"):
                p.uniform_(-0.5, 0.5)
    model.pack_for_decoding()
    return model


def _compare_steps(model, prompt_len: int, steps: int, tol: dict):
    """Prefill a random prompt into two caches, then `steps` greedy steps: the fused step on
    one, the model's own on the other; logits compared at each. -> (fused, ref) caches."""
    pdl = fused_decode.pdl_supported(torch.device(DEVICE))
    prompt = torch.randint(0, 512, (1, prompt_len), device=DEVICE)
    fused, ref = model.new_cache(1, 32), model.new_cache(1, 32)
    model(prompt, cache=fused), model(prompt, cache=ref)
    tok = prompt[:, -1:]
    for step in range(steps):
        got = fused_decode.decode_step(model, tok, fused, pdl=pdl)
        want = model(tok, cache=ref).logits
        torch.testing.assert_close(got.float(), want.float(), **tol, msg=lambda m, s=step: f"step {s}: {m}")
        tok = want[:, -1].argmax(-1, keepdim=True)
    return fused, ref


@torch.no_grad()
def test_fused_step_matches_the_layer_by_layer_step():
    """Logits, SSM and conv states and KV caches of 6 decode steps after a prompt: the
    fused step on one cache, the model's own step on another."""
    fused, ref = _compare_steps(_model(), prompt_len=9, steps=6, tol=TOL)
    assert fused.seqlen == ref.seqlen == 15 and int(fused.offset) == 15
    for i, (a, b) in enumerate(zip(fused.layers, ref.layers)):
        for name in ("conv", "ssm") if hasattr(a, "ssm") else ("k", "v"):
            torch.testing.assert_close(getattr(a, name).float(), getattr(b, name).float(), **TOL,
                                       msg=lambda m, i=i, n=name: f"layer {i} {n}: {m}")


@pytest.mark.skipif(DEVICE != "cuda", reason="graph decoding needs a GPU")
@torch.no_grad()
def test_graph_decoding_takes_the_fused_step_and_agrees_with_the_layer_by_layer_step():
    model = _model()
    prompt = torch.randint(0, 512, (1, 7), device=DEVICE)
    fused = model.generate(prompt, max_new_tokens=24, temperature=0, cuda_graphs=True)
    assert any(d.fused for d in generation._GRAPH_DECODERS[model].values())
    model.fused_decode = False
    layerwise = model.generate(prompt, max_new_tokens=24, temperature=0, cuda_graphs=True)
    assert not any(d.fused for d in generation._GRAPH_DECODERS[model].values() if d.key[4] is False)
    assert (fused[:, :16] == layerwise[:, :16]).all()  # bf16: argmax ties may differ later


@torch.no_grad()
def test_fused_step_runs_int8_weight_only_linears():
    """INT8 weight-only models (platform/post/quantize.py) take the same GEMV: int8 codes
    times a scale per row; against the model's own INT8 step (bf16-level tolerance: that
    one rounds its input to bf16 first)."""
    from mamba_slm.platform.post.quantize import QuantConfig, quantize_model

    model = quantize_model(_model(), QuantConfig(bits=8))
    model.pack_for_decoding()
    assert fused_decode.weight_of(model.layers[0].mixer.in_proj)[0].dtype == torch.int8
    assert fused_decode.weight_of(model.layers[1].mixer.qkv)[1] is not None  # packed INT8 q|k|v
    _compare_steps(model, prompt_len=5, steps=4, tol=dict(atol=3e-2, rtol=3e-2))
