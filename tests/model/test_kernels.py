"""model/kernels.py against its PyTorch reference: on a GPU, or on the CPU under Triton's
interpreter (`TRITON_INTERPRET=1` with triton installed); skipped otherwise."""
import os

import pytest
import torch

from mamba_slm.model import kernels

if torch.cuda.is_available() and kernels.triton is not None:
    DEVICE = "cuda"
elif kernels.triton is not None and os.environ.get("TRITON_INTERPRET") == "1":
    DEVICE = "cpu"
else:
    DEVICE = None
pytestmark = pytest.mark.skipif(DEVICE is None, reason="needs triton: a GPU, or TRITON_INTERPRET=1 on the CPU")


@pytest.mark.parametrize("dtype,cache_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                                (torch.bfloat16, torch.float32)])
@pytest.mark.parametrize("head_dim,rotary_dim", [(64, 32), (128, 128), (80, 40)])
def test_rope_cache_update_matches_reference(dtype, cache_dtype, head_dim, rotary_dim):
    torch.manual_seed(0)
    B, H, KVH, L, pos = 3, 8, 2, 24, 11
    qkv = torch.randn(B, (H + 2 * KVH) * head_dim, device=DEVICE).to(dtype)
    angles = torch.rand(L, rotary_dim, device=DEVICE) * 6
    rope = torch.stack([angles.cos(), angles.sin()], dim=1)  # (L, 2, rotary_dim)
    offset = torch.tensor([pos], device=DEVICE)
    k, v = (torch.randn(B, KVH, L, head_dim, device=DEVICE).to(cache_dtype) for _ in range(2))
    caches = [k, v, k.clone(), v.clone()]
    q_ref = kernels.rope_cache_update_ref(qkv, rope, offset, caches[0], caches[1], H, head_dim)
    q = kernels.rope_cache_update(qkv, rope, offset, caches[2], caches[3], H, head_dim)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(q, q_ref, **tol)
    torch.testing.assert_close(caches[2], caches[0], **tol)  # only position `pos` written
    torch.testing.assert_close(caches[3], caches[1], **tol)
    assert q.shape == (B, H, head_dim) and q.dtype == dtype


@pytest.mark.parametrize("dtype,cache_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                                (torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16)])
@pytest.mark.parametrize("B,KVH,G,D,max_len", [(1, 4, 4, 128, 1024), (2, 2, 1, 64, 300), (1, 1, 8, 16, 64)])
def test_decode_attention_matches_reference(dtype, cache_dtype, B, KVH, G, D, max_len):
    """The flash-decoding kernel against SDPA over the masked cache, at offsets inside the
    first block, at split boundaries (SPLIT = 256) and at the last position; positions past
    the offset hold garbage that must not leak in (SDPA masks it, the kernel never reads it).
    A cache in another dtype (fp32 under bf16 autocast) is read in the query's."""
    if DEVICE == "cpu" and dtype == torch.bfloat16:
        pytest.skip("Triton 3.6's interpreter computes bf16 tl.dot wrongly (~1e10 off on random 16x16)")
    torch.manual_seed(0)
    q = torch.randn(B, KVH, G, D, device=DEVICE).to(dtype)
    k, v = (torch.randn(B, KVH, max_len, D, device=DEVICE).to(cache_dtype) for _ in range(2))
    split = kernels.DECODE_SPLIT
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    assert kernels.decode_attention(q, k, v, torch.tensor([0], device=DEVICE)).dtype == dtype
    for pos in sorted({0, 5, split - 1, split, split + 1, max_len // 2, max_len - 1} & set(range(max_len))):
        offset = torch.tensor([pos], device=DEVICE)
        want = kernels.decode_attention_ref(q, k, v, offset)
        got = kernels.decode_attention(q, k, v, offset)
        torch.testing.assert_close(got, want, **tol, msg=lambda m, pos=pos: f"offset {pos}: {m}")
        k2, v2 = k.clone(), v.clone()
        k2[:, :, pos + 1:], v2[:, :, pos + 1:] = float("nan"), float("nan")
        if DEVICE == "cuda" or pos < 64:  # the interpreter is slow; one NaN case there
            torch.testing.assert_close(kernels.decode_attention(q, k2, v2, offset), got, rtol=0, atol=0)
