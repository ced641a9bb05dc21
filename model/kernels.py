"""Triton kernels of this project (GPU only; each has a PyTorch reference that the CPU runs
and the GPU tests compare against).

`rope_cache_update`: the glue of one attention decode step in one launch. Given the packed
q|k|v projection of one token per row, it applies RoPE to the query and key heads at the
cache position (a device tensor, so the kernel is the same at every step and replays
inside a CUDA graph), writes the rotated query to `q_out`, and writes the key and value
into the static cache at that position. In PyTorch the same is ~14 launches (rope
gather, casts, chunk/neg/cat of rotate-half, products, two index_copy_), each a few
microseconds at batch 1.
"""
from __future__ import annotations

import torch

from .layers import apply_rotary

try:
    import triton
    import triton.language as tl
except Exception:  # noqa: BLE001 - optional (ships with CUDA builds of torch)
    triton = tl = None


if triton is not None:
    @triton.jit
    def _rope_cache_kernel(qkv_ptr, rope_ptr, offset_ptr, q_ptr, k_ptr, v_ptr,
                           stride_qkv, stride_q, stride_kb, stride_kh, stride_kt,
                           stride_vb, stride_vh, stride_vt,
                           H: tl.constexpr, KVH: tl.constexpr, D: tl.constexpr, RD: tl.constexpr,
                           BLOCK_D: tl.constexpr):
        b = tl.program_id(0)
        head = tl.program_id(1)  # [0, H): query heads, [H, H + KVH): keys, then values
        pos = tl.load(offset_ptr)
        d = tl.arange(0, BLOCK_D)
        in_head = d < D
        row = qkv_ptr + b * stride_qkv + head * D
        x = tl.load(row + d, mask=in_head, other=0.0)
        if head < H + KVH:
            half: tl.constexpr = RD // 2
            rotary = d < RD
            # rotate-half: channel d < RD/2 pairs with d + RD/2 (negated), the others with d - RD/2
            partner = tl.load(row + tl.where(d < half, d + half, d - half), mask=rotary, other=0.0)
            cos = tl.load(rope_ptr + pos * 2 * RD + d, mask=rotary, other=1.0)
            sin = tl.load(rope_ptr + pos * 2 * RD + RD + d, mask=rotary, other=0.0)
            xf, pf = x.to(tl.float32), partner.to(tl.float32)
            rotated = xf * cos + tl.where(d < half, -pf, pf) * sin
            y = tl.where(rotary, rotated, xf).to(x.dtype)  # rounded as the PyTorch path rounds
            if head < H:
                tl.store(q_ptr + b * stride_q + head * D + d, y, mask=in_head)
            else:
                tl.store(k_ptr + b * stride_kb + (head - H) * stride_kh + pos * stride_kt + d, y, mask=in_head)
        else:
            tl.store(v_ptr + b * stride_vb + (head - H - KVH) * stride_vh + pos * stride_vt + d, x, mask=in_head)


def rope_cache_update(qkv: torch.Tensor, rope: torch.Tensor, offset: torch.Tensor, k_cache: torch.Tensor,
                      v_cache: torch.Tensor, n_heads: int, head_dim: int) -> torch.Tensor:
    """qkv (B, (H + 2 KVH) * D) -> rotated queries (B, H, D); keys and values written into
    the caches (B, KVH, max_len, D) at position `offset` (a (1,) int64 device tensor).
    `rope` (max_len, 2, rotary_dim) float32: cos and sin per position."""
    b, kvh = qkv.shape[0], k_cache.shape[1]
    assert qkv.stride(-1) == 1 and rope.is_contiguous() and k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1
    q = torch.empty(b, n_heads, head_dim, dtype=qkv.dtype, device=qkv.device)
    _rope_cache_kernel[(b, n_heads + 2 * kvh)](
        qkv, rope, offset, q, k_cache, v_cache,
        qkv.stride(0), q.stride(0), *k_cache.stride()[:3], *v_cache.stride()[:3],
        H=n_heads, KVH=kvh, D=head_dim, RD=rope.shape[-1], BLOCK_D=triton.next_power_of_2(head_dim))
    return q


def rope_cache_update_ref(qkv: torch.Tensor, rope: torch.Tensor, offset: torch.Tensor, k_cache: torch.Tensor,
                          v_cache: torch.Tensor, n_heads: int, head_dim: int) -> torch.Tensor:
    """The same in PyTorch (the CPU path, and what the kernel is tested against)."""
    b, kvh = qkv.shape[0], k_cache.shape[1]
    q, k, v = qkv.view(b, -1, 1, head_dim).split([n_heads, kvh, kvh], dim=1)  # (B, heads, 1, D)
    cos, sin = rope.index_select(0, offset).unbind(1)  # (1, rotary_dim) each
    q, k = apply_rotary(torch.cat([q, k], dim=1), cos, sin).split([n_heads, kvh], dim=1)
    k_cache.index_copy_(2, offset, k.to(k_cache.dtype))
    v_cache.index_copy_(2, offset, v.to(v_cache.dtype))
    return q.squeeze(2)
