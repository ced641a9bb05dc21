"""Kernel path (mamba-ssm Triton SSD, causal-conv1d) against the PyTorch reference.

Runs on a CUDA machine with mamba-ssm installed (see bench/RESULTS.md for the numbers and
the device command); skipped elsewhere. Errors are measured relative to the largest
magnitude of the reference output, and printed (run with -s to see them).
"""
import pytest
import torch

from mamba_slm.model import HybridLM, ModelConfig
from mamba_slm.model import mamba2, ssd

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(
    not ssd.kernels_available(), reason="needs CUDA and mamba-ssm (GPU kernels)")]

# Tolerances: the kernels accumulate in fp32 but use TF32/bf16 tensor-core dots, and chunk
# boundaries differ from the reference's; bf16 inputs lose ~3 significant digits.
TOL = {torch.float32: 5e-3, torch.bfloat16: 3e-2}


def _rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


def _inputs(dtype, b=2, T=1000, h=16, p=64, g=1, n=128):
    gen = torch.Generator(device="cuda").manual_seed(0)
    kw = dict(device="cuda", generator=gen)
    x = torch.randn(b, T, h, p, **kw).to(dtype)
    dt = torch.nn.functional.softplus(torch.randn(b, T, h, **kw) - 2)
    A = -torch.rand(h, **kw) * 8 - 1
    B, C = torch.randn(b, T, g, n, **kw).to(dtype), torch.randn(b, T, g, n, **kw).to(dtype)
    D = torch.randn(h, **kw)
    seq_idx = torch.zeros(b, T, dtype=torch.int32, device="cuda")
    seq_idx[0, 300:], seq_idx[0, 700:] = 1, 2
    seq_idx[1, 511:] = 1
    return x, dt, A, B, C, D, seq_idx


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("packed", [False, True])
def test_ssd_kernel_matches_reference(dtype, packed):
    x, dt, A, B, C, D, seq_idx = _inputs(dtype)
    seq_idx = seq_idx if packed else None
    y_k, s_k = ssd.ssd_scan("kernel", x, dt, A, B, C, 256, D, seq_idx=seq_idx, return_final_states=True)
    y_r, s_r = ssd.ssd_chunked_ref(x, dt, A, B, C, 256, D=D, seq_idx=seq_idx, return_final_states=True)
    err_y, err_s = _rel_err(y_k, y_r), _rel_err(s_k, s_r)
    print(f"\nSSD {dtype} packed={packed}: rel err y {err_y:.2e}, final state {err_s:.2e}")
    assert err_y < TOL[dtype] and err_s < TOL[dtype]


@pytest.mark.skipif(mamba2.causal_conv1d_fn is None, reason="needs causal-conv1d")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_conv_kernel_matches_reference(dtype):
    x, *_, seq_idx = _inputs(dtype)
    xc = torch.randn(2, 1000, 384, device="cuda").to(dtype)  # (B, T, C) -> channel-last view
    w, bias = torch.randn(384, 1, 4, device="cuda").to(dtype), torch.randn(384, device="cuda").to(dtype)
    out_k = mamba2.causal_conv1d_fn(xc.transpose(1, 2), w.squeeze(1), bias, seq_idx=seq_idx, activation="silu")
    out_r = torch.nn.functional.silu(mamba2.causal_conv_ref(xc.transpose(1, 2).float(), w.float(),
                                                            bias.float(), seq_idx))
    err = _rel_err(out_k, out_r)
    print(f"\nconv {dtype}: rel err {err:.2e}")
    assert err < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_document_conv_matches_eager(dtype):
    """The kernel path's conv without causal-conv1d (mamba2.conv_silu, torch.compile'd):
    output and gradients of input, weight and bias against the eager reference."""
    *_, seq_idx = _inputs(dtype)
    gen = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(2, 384, 1000, device="cuda", generator=gen).to(dtype).requires_grad_()
    w = torch.randn(384, 1, 4, device="cuda", generator=gen).requires_grad_()
    bias = torch.randn(384, device="cuda", generator=gen).requires_grad_()
    grad = torch.randn(2, 384, 1000, device="cuda", generator=gen).to(dtype)
    outs = []
    for fn in (mamba2.conv_silu, lambda *a: torch.nn.functional.silu(mamba2.causal_conv_ref(*a))):
        x.grad = w.grad = bias.grad = None
        out = fn(x, w, bias, seq_idx)
        out.backward(grad)
        outs.append([out, x.grad, w.grad, bias.grad])
    errs = [_rel_err(a, ref) for a, ref in zip(*outs)]
    print(f"\ncompiled conv {dtype}: rel err out/dx/dw/dbias " + " ".join(f"{e:.2e}" for e in errs))
    assert max(errs) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_model_kernel_path_matches_reference_path(dtype):
    torch.manual_seed(0)
    cfg = dict(hidden_size=256, n_layers=4, layer_pattern="MAMM", n_heads=4, n_kv_heads=2,
               mlp_hidden_size=512, mamba_head_dim=64, mamba_d_state=64, mamba_chunk_size=128,
               max_seq_len=1024)
    ref = HybridLM(ModelConfig.from_name("tiny", ssm_path="reference", attn_impl="sdpa", **cfg)).cuda()
    ker = HybridLM(ModelConfig.from_name("tiny", ssm_path="kernel", attn_impl="auto", **cfg)).cuda()
    ker.load_state_dict(ref.state_dict())
    ids = torch.randint(0, 4000, (2, 700), device="cuda")
    seq_idx = torch.zeros(2, 700, dtype=torch.int32, device="cuda")
    seq_idx[:, 333:] = 1
    losses, grads = {}, {}
    for name, model in (("ref", ref), ("kernel", ker)):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            out = model(ids, seq_idx=seq_idx, labels=ids)
        out.loss.backward()
        losses[name] = out.loss.item()
        grads[name] = torch.cat([p.grad.flatten() for p in model.parameters()])
        logits = out.logits
        if name == "ref":
            logits_ref = logits
    err_logits = _rel_err(logits, logits_ref)
    err_grad = ((grads["kernel"] - grads["ref"]).norm() / grads["ref"].norm()).item()
    print(f"\nmodel {dtype}: loss {losses}, rel err logits {err_logits:.2e}, grad rel L2 {err_grad:.2e}")
    assert abs(losses["ref"] - losses["kernel"]) < 10 * TOL[dtype]
    assert err_logits < 3 * TOL[dtype] and err_grad < 10 * TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_flex_document_attention_matches_dense_mask(dtype):
    """FlexAttention (compiled, block mask of the documents) against SDPA with the dense
    document mask: output and gradients of q, k, v, with GQA."""
    from mamba_slm.model.attention import Attention

    torch.manual_seed(0)
    cfg = dict(hidden_size=256, n_heads=4, n_kv_heads=2, max_seq_len=2048)
    dense = Attention(ModelConfig.from_name("tiny", attn_impl="sdpa", **cfg)).cuda()
    flex = Attention(ModelConfig.from_name("tiny", attn_impl="flex", **cfg)).cuda()
    flex.load_state_dict(dense.state_dict())
    x = torch.randn(2, 1024, 256, device="cuda")
    seq_idx = torch.zeros(2, 1024, dtype=torch.int32, device="cuda")
    seq_idx[0, 100:], seq_idx[0, 700:], seq_idx[1, 511:] = 1, 2, 1
    outs, grads = [], []
    for model in (dense, flex):
        xi = x.clone().requires_grad_()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            out = model(xi, seq_idx=seq_idx)
        out.float().square().mean().backward()
        outs.append(out)
        grads.append(torch.cat([xi.grad.flatten()] + [p.grad.flatten() for p in model.parameters()]))
    err = _rel_err(outs[1], outs[0])
    err_grad = ((grads[1] - grads[0]).norm() / grads[0].norm()).item()
    print(f"\nflex {dtype}: rel err out {err:.2e}, grad rel L2 {err_grad:.2e}")
    assert err < TOL[dtype] and err_grad < 3 * TOL[dtype]
