"""Triton kernels of this project (GPU only; each has a PyTorch reference that the CPU runs
and the GPU tests compare against).

`rope_cache_update`: the glue of one attention decode step in one launch. Given the packed
q|k|v projection of one token per row, it applies RoPE to the query and key heads at the
cache position (a device tensor, so the kernel is the same at every step and replays
inside a CUDA graph), writes the rotated query to `q_out`, and writes the key and value
into the static cache at that position. In PyTorch the same is ~14 launches (rope
gather, casts, chunk/neg/cat of rotate-half, products, two index_copy_), each a few
microseconds at batch 1.

`decode_attention`: one query token per row against the static KV cache, reading only
the filled positions (flash-decoding: the filled keys split into blocks of SPLIT
positions, one program per (row, kv head, split) with an online softmax, then one program
per (row, kv head) combining the splits). The number of filled positions is read from the
cache's device counter, so the grid is fixed by the cache length and the step replays
inside a CUDA graph. SDPA with a (max_len,) mask reads and masks the whole cache: on an
H200 the 1.3B step took 1.39 ms with a 256-position cache and 2.31 ms with 8,192.
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
                           BLOCK_D: tl.constexpr, USE_PDL: tl.constexpr = False):
        b = tl.program_id(0)
        head = tl.program_id(1)  # [0, H): query heads, [H, H + KVH): keys, then values
        if USE_PDL:  # launched early (model/fused_decode.py): wait for qkv
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
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
                      v_cache: torch.Tensor, n_heads: int, head_dim: int, pdl: bool = False) -> torch.Tensor:
    """qkv (B, (H + 2 KVH) * D) -> rotated queries (B, H, D); keys and values written into
    the caches (B, KVH, max_len, D) at position `offset` (a (1,) int64 device tensor).
    `rope` (max_len, 2, rotary_dim) float32: cos and sin per position. pdl: launched with
    Programmatic Dependent Launch (sm90+; `model/fused_decode.py`)."""
    b, kvh = qkv.shape[0], k_cache.shape[1]
    assert qkv.stride(-1) == 1 and rope.is_contiguous() and k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1
    q = torch.empty(b, n_heads, head_dim, dtype=qkv.dtype, device=qkv.device)
    _rope_cache_kernel[(b, n_heads + 2 * kvh)](
        qkv, rope, offset, q, k_cache, v_cache,
        qkv.stride(0), q.stride(0), *k_cache.stride()[:3], *v_cache.stride()[:3],
        H=n_heads, KVH=kvh, D=head_dim, RD=rope.shape[-1], BLOCK_D=triton.next_power_of_2(head_dim),
        USE_PDL=pdl, **({"launch_pdl": True} if pdl else {}))
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


DECODE_SPLIT = 256  # cache positions per program of decode_attention
if triton is not None:
    @triton.jit
    def _decode_attn_split_kernel(q_ptr, k_ptr, v_ptr, offset_ptr, acc_ptr, ml_ptr, scale,
                                  stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt,
                                  KVH: tl.constexpr, G: tl.constexpr, D: tl.constexpr, NSPLIT: tl.constexpr,
                                  SPLIT: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr,
                                  IEEE: tl.constexpr, USE_PDL: tl.constexpr = False):
        bh = tl.program_id(0)  # row * KVH + kv head
        split = tl.program_id(1)
        b, h = bh // KVH, bh % KVH
        if USE_PDL:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        n_valid = tl.load(offset_ptr) + 1  # this step's key is written: positions [0, offset]
        start = split * SPLIT
        g = tl.arange(0, BLOCK_G)
        d = tl.arange(0, D)
        q = tl.load(q_ptr + (bh * G + g[:, None]) * D + d[None, :], mask=g[:, None] < G, other=0.0)
        m = tl.full((BLOCK_G,), float("-inf"), tl.float32)
        l = tl.zeros((BLOCK_G,), tl.float32)
        acc = tl.zeros((BLOCK_G, D), tl.float32)
        k_base = k_ptr + b * stride_kb + h * stride_kh
        v_base = v_ptr + b * stride_vb + h * stride_vh
        for n0 in range(0, SPLIT, BLOCK_N):  # a static trip count (Triton's interpreter needs one)
            if start + n0 < n_valid:  # blocks holding filled positions only
                n = start + n0 + tl.arange(0, BLOCK_N)
                ok = n < n_valid
                k = tl.load(k_base + n[:, None] * stride_kt + d[None, :], mask=ok[:, None], other=0.0).to(q.dtype)
                if IEEE:
                    s = tl.dot(q, tl.trans(k), input_precision="ieee")
                else:
                    s = tl.dot(q, tl.trans(k))
                s = tl.where(ok[None, :], s * scale, float("-inf"))
                m_new = tl.maximum(m, tl.max(s, 1))  # finite: the first block holds a filled key
                alpha = tl.exp(m - m_new)
                p = tl.exp(s - m_new[:, None])
                l = l * alpha + tl.sum(p, 1)
                v = tl.load(v_base + n[:, None] * stride_vt + d[None, :], mask=ok[:, None], other=0.0).to(q.dtype)
                if IEEE:
                    acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
                else:
                    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
                m = m_new
        if start < n_valid:  # splits past the filled positions store nothing: the combine skips them
            row = bh * NSPLIT + split
            tl.store(acc_ptr + (row * BLOCK_G + g[:, None]) * D + d[None, :], acc)
            tl.store(ml_ptr + (row * 2) * BLOCK_G + g, m)
            tl.store(ml_ptr + (row * 2 + 1) * BLOCK_G + g, l)

    @triton.jit
    def _decode_attn_combine_kernel(acc_ptr, ml_ptr, out_ptr, offset_ptr,
                                    G: tl.constexpr, D: tl.constexpr, NSPLIT: tl.constexpr,
                                    SPLIT: tl.constexpr, BLOCK_G: tl.constexpr, USE_PDL: tl.constexpr = False):
        bh = tl.program_id(0)
        if USE_PDL:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        g = tl.arange(0, BLOCK_G)
        d = tl.arange(0, D)
        used = tl.minimum(tl.cdiv(tl.load(offset_ptr) + 1, SPLIT), NSPLIT)  # splits holding keys
        m = tl.full((BLOCK_G,), float("-inf"), tl.float32)
        l = tl.zeros((BLOCK_G,), tl.float32)
        acc = tl.zeros((BLOCK_G, D), tl.float32)
        for split in range(0, NSPLIT):
            if split < used:
                row = bh * NSPLIT + split
                m_s = tl.load(ml_ptr + (row * 2) * BLOCK_G + g)
                l_s = tl.load(ml_ptr + (row * 2 + 1) * BLOCK_G + g)
                acc_s = tl.load(acc_ptr + (row * BLOCK_G + g[:, None]) * D + d[None, :])
                m_new = tl.maximum(m, m_s)
                alpha, beta = tl.exp(m - m_new), tl.exp(m_s - m_new)
                l = l * alpha + l_s * beta
                acc = acc * alpha[:, None] + acc_s * beta[:, None]
                m = m_new
        out = acc / l[:, None]
        tl.store(out_ptr + (bh * G + g[:, None]) * D + d[None, :], out.to(out_ptr.dtype.element_ty),
                 mask=g[:, None] < G)


def decode_attention_supported(head_dim: int, group: int) -> bool:
    """Shapes the kernel takes: head_dim a power of two in [16, 256], at most 16 query
    heads per kv head (every preset: 128 and 4-5)."""
    return head_dim & (head_dim - 1) == 0 and 16 <= head_dim <= 256 and group <= 16


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     offset: torch.Tensor, pdl: bool = False) -> torch.Tensor:
    """q (B, KVH, G, D): the G query heads of each kv head, for one token per row at
    position `offset` ((1,) int64 device tensor, its key already written); caches
    (B, KVH, max_len, D). -> (B, KVH, G, D): softmax(q k^T / sqrt(D)) v over positions
    [0, offset], as `decode_attention_ref`, in q's dtype (a cache of another dtype, e.g.
    fp32 under bf16 autocast, is read and rounded to it)."""
    B, KVH, G, D = q.shape
    max_len = k_cache.shape[2]
    assert decode_attention_supported(D, G) and k_cache.shape == v_cache.shape
    assert k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1
    q = q.contiguous()
    nsplit = triton.cdiv(max_len, DECODE_SPLIT)
    block_g = 16  # tl.dot's smallest M; rows past G are zeros
    acc = torch.empty(B * KVH * nsplit * block_g * D, dtype=torch.float32, device=q.device)
    ml = torch.empty(B * KVH * nsplit * 2 * block_g, dtype=torch.float32, device=q.device)
    out = torch.empty_like(q)
    ieee = q.dtype == torch.float32  # fp32 models: no TF32 rounding in the products
    launch = {"launch_pdl": True} if pdl else {}  # Programmatic Dependent Launch (model/fused_decode.py)
    _decode_attn_split_kernel[(B * KVH, nsplit)](
        q, k_cache, v_cache, offset, acc, ml, D ** -0.5, *k_cache.stride()[:3], *v_cache.stride()[:3],
        KVH=KVH, G=G, D=D, NSPLIT=nsplit, SPLIT=DECODE_SPLIT, BLOCK_G=block_g, BLOCK_N=64 if D <= 128 else 32,
        IEEE=ieee, USE_PDL=pdl, num_warps=4, **launch)
    _decode_attn_combine_kernel[(B * KVH,)](acc, ml, out, offset, G=G, D=D, NSPLIT=nsplit, SPLIT=DECODE_SPLIT,
                                            BLOCK_G=block_g, USE_PDL=pdl, num_warps=4, **launch)
    return out


def decode_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                         offset: torch.Tensor) -> torch.Tensor:
    """The same with SDPA over the whole cache and a mask of the filled positions (the CPU
    path, and what the kernel is tested against)."""
    valid = (torch.arange(k_cache.shape[2], device=q.device) <= offset)[None]  # (1, max_len)
    return torch.nn.functional.scaled_dot_product_attention(q, k_cache.to(q.dtype), v_cache.to(q.dtype),
                                                            attn_mask=valid)
