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

import os

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


# ---------------------------------------------------------------------------------------
# One-row matmuls with their input's norm fused in (the batch-1 decode step).
#
# At batch 1 each of a layer's matmuls is a GEMV that reads its weight once, and the work
# between them (residual add + RMSNorm, Mamba-2's gated RMSNorm, SwiGLU's silu(g) * u) is a
# chain of kernels over one row of a few thousand values: each costs a launch and a few
# microseconds of ramp-up, about as much as a GEMV of a 2048 x 2048 weight. Here that work
# runs in the GEMV's prologue instead. Every program of the GEMV needs the whole input row
# anyway (it owns BLOCK_N output rows and walks all of K), so it computes the row's norm
# itself -- a first pass over the row for the sum of squares, then the normalised values
# chunk by chunk as the weight tiles stream in. The row is a few KiB and sits in L1/L2;
# the weight is read once, as by a plain GEMV. The results round where the unfused kernels
# round (the normalised input to the input's dtype before the matmul; the residual sum
# to the residual's dtype, its norm taken from the unrounded sum, as mamba-ssm's fused
# add + RMSNorm does), so the fused step matches the unfused one to accumulation order.
# ---------------------------------------------------------------------------------------
GEMV_PLAIN, GEMV_RMSNORM, GEMV_ADD_RMSNORM, GEMV_GATED_RMSNORM, GEMV_SILU_MUL = range(5)

if triton is not None:
    _GEMV_CONFIGS = [triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)
                     for n, k, w, s in ((8, 256, 4, 3), (8, 512, 4, 3), (16, 256, 4, 3), (16, 512, 4, 3),
                                        (16, 512, 8, 3), (32, 256, 4, 3), (32, 256, 8, 3), (64, 128, 4, 3),
                                        (4, 1024, 4, 3), (16, 1024, 8, 2))]
    if os.environ.get("TRITON_INTERPRET") == "1":  # on the CPU: no timing to tune by
        _GEMV_CONFIGS = [triton.Config({"BLOCK_N": 16, "BLOCK_K": 32})]

    @triton.jit
    def _gemv_input(x_ptr, aux_ptr, nw_ptr, k, kmask, rstd, PROLOGUE: tl.constexpr, K: tl.constexpr):
        """The GEMV's input at columns k (float32, rounded to the input dtype as the unfused
        kernel's output would be)."""
        x = tl.load(x_ptr + k, mask=kmask, other=0.0)
        if PROLOGUE == 0:
            return x.to(tl.float32)
        if PROLOGUE == 4:  # silu(gate) * up; x holds [gate | up], K = width of each
            up = tl.load(x_ptr + K + k, mask=kmask, other=0.0).to(tl.float32)
            g = x.to(tl.float32)
            return (g * tl.sigmoid(g) * up).to(x.dtype).to(tl.float32)
        v = x.to(tl.float32)
        if PROLOGUE == 2:
            v += tl.load(aux_ptr + k, mask=kmask, other=0.0).to(tl.float32)
        if PROLOGUE == 3:
            z = tl.load(aux_ptr + k, mask=kmask, other=0.0).to(tl.float32)
            v = v * z * tl.sigmoid(z)
        w = tl.load(nw_ptr + k, mask=kmask, other=0.0).to(tl.float32)
        return (v * rstd * w).to(x.dtype).to(tl.float32)

    @triton.autotune(configs=_GEMV_CONFIGS, key=["N", "K", "PROLOGUE"])
    @triton.jit
    def _gemv_kernel(x_ptr, w_ptr, out_ptr, aux_ptr, res_out_ptr, nw_ptr, N, stride_wn, eps,
                     K: tl.constexpr, GROUP: tl.constexpr, PROLOGUE: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        pid = tl.program_id(0)
        rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        row_mask = rows < N
        cols = tl.arange(0, BLOCK_K)
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)  # reduced over K once, at the end
        for g0 in tl.static_range(0, K, GROUP):  # norm groups (one of K unless gated with groups)
            rstd = 1.0
            if PROLOGUE == 1 or PROLOGUE == 2 or PROLOGUE == 3:
                sq = tl.zeros((BLOCK_K,), dtype=tl.float32)
                for k0 in range(0, GROUP, BLOCK_K):
                    k = g0 + k0 + cols
                    kmask = k0 + cols < GROUP
                    v = tl.load(x_ptr + k, mask=kmask, other=0.0).to(tl.float32)
                    if PROLOGUE == 2:
                        v += tl.load(aux_ptr + k, mask=kmask, other=0.0).to(tl.float32)
                    if PROLOGUE == 3:
                        z = tl.load(aux_ptr + k, mask=kmask, other=0.0).to(tl.float32)
                        v = v * z * tl.sigmoid(z)
                    sq += v * v
                rstd = 1.0 / tl.sqrt(tl.sum(sq, axis=0) / GROUP + eps)
            for k0 in range(0, GROUP, BLOCK_K):
                k = g0 + k0 + cols
                kmask = k0 + cols < GROUP
                inp = _gemv_input(x_ptr, aux_ptr, nw_ptr, k, kmask, rstd, PROLOGUE, K)
                if PROLOGUE == 2:
                    if pid == 0:  # the residual sum, written once
                        s = (tl.load(x_ptr + k, mask=kmask, other=0.0).to(tl.float32)
                             + tl.load(aux_ptr + k, mask=kmask, other=0.0).to(tl.float32))
                        tl.store(res_out_ptr + k, s.to(res_out_ptr.dtype.element_ty), mask=kmask)
                w = tl.load(w_ptr + rows[:, None] * stride_wn + k[None, :],
                            mask=row_mask[:, None] & kmask[None, :], other=0.0)
                acc += w.to(tl.float32) * inp[None, :]
        tl.store(out_ptr + rows, tl.sum(acc, axis=1).to(out_ptr.dtype.element_ty), mask=row_mask)


def _gemv_launch(prologue: int, x: torch.Tensor, weight: torch.Tensor, aux: torch.Tensor | None = None,
                 norm_weight: torch.Tensor | None = None, eps: float = 0.0, group: int | None = None):
    """x (1, K) (or (1, 2K) for GEMV_SILU_MUL) -> (out (1, N), residual sum (1, K) or None)."""
    N, K = weight.shape
    assert x.shape[0] == 1 and x.stride(-1) == 1 and weight.stride(-1) == 1, "one contiguous row"
    assert x.shape[-1] == (2 * K if prologue == GEMV_SILU_MUL else K)
    out = torch.empty(1, N, dtype=x.dtype, device=x.device)
    res_out = torch.empty_like(x) if prologue == GEMV_ADD_RMSNORM else None
    if aux is not None:
        assert aux.shape == x.shape and aux.stride(-1) == 1
        if prologue == GEMV_ADD_RMSNORM:
            res_out = torch.empty_like(aux)  # the sum keeps the residual's dtype
    _gemv_kernel[lambda meta: (triton.cdiv(N, meta["BLOCK_N"]),)](
        x, weight, out, x if aux is None else aux, out if res_out is None else res_out,
        weight if norm_weight is None else norm_weight, N, weight.stride(0), eps,
        K=K, GROUP=group or K, PROLOGUE=prologue)
    return out, res_out


def gemv(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x (1, K) @ weight (N, K).T -> (1, N)."""
    return _gemv_launch(GEMV_PLAIN, x, weight)[0]


def rmsnorm_gemv(x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor, eps: float,
                 weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm(x + residual) @ weight.T, and the sum (the residual stream going on); with
    residual None, RMSNorm(x) @ weight.T and x. One launch."""
    if residual is None:
        return _gemv_launch(GEMV_RMSNORM, x, weight, None, norm_weight, eps)[0], x
    return _gemv_launch(GEMV_ADD_RMSNORM, x, weight, residual, norm_weight, eps)


def gated_rmsnorm_gemv(x: torch.Tensor, gate: torch.Tensor, norm_weight: torch.Tensor, eps: float,
                       group: int, weight: torch.Tensor) -> torch.Tensor:
    """RMSNorm(x * silu(gate)) (per group of `group` channels) @ weight.T. One launch."""
    return _gemv_launch(GEMV_GATED_RMSNORM, x, weight, gate, norm_weight, eps, group)[0]


def silu_mul_gemv(gate_up: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """(silu(gate) * up) @ weight.T for gate_up = [gate | up] (1, 2K). One launch."""
    return _gemv_launch(GEMV_SILU_MUL, gate_up, weight)[0]


def _rms(v: torch.Tensor, group: int, eps: float) -> torch.Tensor:
    g = v.unflatten(-1, (-1, group))
    return (g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + eps)).flatten(-2)


def gemv_ref(x, weight):
    return x @ weight.t()


def rmsnorm_gemv_ref(x, residual, norm_weight, eps, weight):
    s = x.float() if residual is None else x.float() + residual.float()
    out = ((_rms(s, s.shape[-1], eps) * norm_weight.float()).to(x.dtype)) @ weight.t()
    return out, x if residual is None else s.to(residual.dtype)


def gated_rmsnorm_gemv_ref(x, gate, norm_weight, eps, group, weight):
    v = x.float() * torch.nn.functional.silu(gate.float())
    return ((_rms(v, group, eps) * norm_weight.float()).to(x.dtype)) @ weight.t()


def silu_mul_gemv_ref(gate_up, weight):
    g, u = gate_up.float().chunk(2, dim=-1)
    return (torch.nn.functional.silu(g) * u).to(gate_up.dtype) @ weight.t()
