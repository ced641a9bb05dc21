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
