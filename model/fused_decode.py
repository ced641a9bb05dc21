"""The batch-1 decode step as a chain of Triton kernels with Programmatic Dependent Launch.

A decode step at batch 1 reads every weight once, in one-row matmuls (GEMVs), and in
between does a little work on vectors of a few thousand values (norms, the conv and SSM
state update, RoPE, attention over the cache). Replayed as one CUDA graph, the layer-by-
layer step (`HybridLM.forward` with a cache: cuBLAS GEMVs plus ~10 small kernels per layer)
streams the weights at about half the card's copy bandwidth, because every kernel starts
only when the previous one has drained: each GEMV pays DRAM latency and the tail of its
last wave again (bench/RESULTS.md, sessions 7-8: a chain of the step's 97 GEMVs took 1.07 ms
with cuBLAS, 0.71 ms as Triton GEMVs with PDL whose programs load their first weight tile
before waiting for the previous kernel).

Here every kernel of the step is launched with PDL (`launch_pdl=True`, sm90+): it starts
while the previous one finishes, loads what no earlier kernel of the step writes (its
first weight tile, its SSM state) and then waits (`gdc_wait`) for the previous kernel's
output; each calls `gdc_launch_dependents` right after its wait, so the next kernel's
prefetch overlaps its own weight stream. A Mamba-2 layer is four launches:

    in_proj(rmsnorm(x + res)) with the causal conv update and silu in its epilogue
    -> SSM state update -> out_proj(gated_rmsnorm(y, z)) -> gate|up(rmsnorm(. + res))
    -> down(silu(gate) * up)

(five with the MLP's two), an attention layer q|k|v(rmsnorm) -> RoPE + cache write
(`kernels.rope_cache_update`) -> decode attention (split + combine) -> o_proj -> the MLP;
the final norm runs in lm_head's GEMV. The norms and SwiGLU's activation sit in the GEMV's
prologue: every program of a GEMV needs the whole input row anyway, so it computes the
row's norm itself (a few KiB from L2). The conv is depthwise, so the in_proj program that
owns a channel's output row owns that channel's conv window too.

Safety of the early start: a kernel reads before its wait only weights and state that
no kernel of the step writes before it (the SSM state was last written by the same kernel
one step earlier, and each kernel completes only after its own wait, so everything two
launches back is complete); it writes only after its wait.

Rounding follows the layer-by-layer step (the residual sum rounded to the residual's
dtype with the norm taken from the unrounded sum, as mamba-ssm's fused add + RMSNorm; the
GEMV's input rounded to the activation dtype; conv and SSM in float32), so the two agree
to accumulation order. INT8 weight-only linears (platform/post/quantize.py) run in the same
GEMV, the int8 codes converted in registers and the row's scale applied to the sum.
`fusable(model, batch, device)` says when this step applies;
`HybridLM.fused_decode = False` turns it off (the benchmark compares both).
"""
from __future__ import annotations

import functools
import os

import torch
import torch.nn as nn

from .attention import Attention
from .kernels import decode_attention, decode_attention_supported, rope_cache_update, tl, triton
from .loss import LMHead
from .mamba2 import Mamba2Mixer

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
PLAIN, RMSNORM, ADD_RMSNORM, GATED_RMSNORM, SILU_MUL = range(5)

if triton is not None:
    @triton.jit
    def _prologue(x_ptr, aux_ptr, nw_ptr, k, kmask, rstd, PROLOGUE: tl.constexpr, K: tl.constexpr):
        """The GEMV's input at columns k in float32, rounded to the activation dtype as
        the unfused kernel's output would be."""
        x = tl.load(x_ptr + k, mask=kmask, other=0.0)
        if PROLOGUE == 0:
            return x.to(tl.float32)
        if PROLOGUE == 4:  # silu(gate) * up; x holds [gate | up], each K wide
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

    @triton.jit
    def _group_rstd(x_ptr, aux_ptr, g0, eps, PROLOGUE: tl.constexpr, GROUP: tl.constexpr,
                    BLOCK_K: tl.constexpr):
        cols = tl.arange(0, BLOCK_K)
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
        return 1.0 / tl.sqrt(tl.sum(sq, axis=0) / GROUP + eps)

    @triton.jit
    def _gemv_kernel(x_ptr, w_ptr, out_ptr, aux_ptr, res_out_ptr, nw_ptr, conv_w_ptr, conv_b_ptr, conv_ptr,
                     scale_ptr, N, stride_wn, eps, conv_lo,
                     K: tl.constexpr, GROUP: tl.constexpr, PROLOGUE: tl.constexpr, HAS_SCALE: tl.constexpr,
                     CONV_DIM: tl.constexpr, WC: tl.constexpr, BLOCK_W: tl.constexpr, CONV_BIAS: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, USE_PDL: tl.constexpr):
        pid = tl.program_id(0)
        rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        row_mask = rows < N
        cols = tl.arange(0, BLOCK_K)
        w_rows = w_ptr + rows[:, None] * stride_wn
        # no kernel writes weights: the first tile streams in while the previous kernel ends
        w0 = tl.load(w_rows + cols[None, :], mask=row_mask[:, None] & (cols[None, :] < K), other=0.0)
        if USE_PDL:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        if PROLOGUE == 2:  # the residual stream going on, written once
            if pid == 0:
                for k0 in range(0, K, BLOCK_K):
                    k = k0 + cols
                    s = (tl.load(x_ptr + k, mask=k < K, other=0.0).to(tl.float32)
                         + tl.load(aux_ptr + k, mask=k < K, other=0.0).to(tl.float32))
                    tl.store(res_out_ptr + k, s.to(res_out_ptr.dtype.element_ty), mask=k < K)
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)  # reduced over K once, at the end
        for g0 in tl.static_range(0, K, GROUP):  # norm groups: one unless a gated norm has several
            rstd = 1.0
            if PROLOGUE == 1 or PROLOGUE == 2 or PROLOGUE == 3:
                rstd = _group_rstd(x_ptr, aux_ptr, g0, eps, PROLOGUE, GROUP, BLOCK_K)
            if g0 == 0:  # the prefetched tile
                acc += w0.to(tl.float32) * _prologue(x_ptr, aux_ptr, nw_ptr, cols, cols < GROUP, rstd,
                                                     PROLOGUE, K)[None, :]
                for k0 in range(BLOCK_K, GROUP, BLOCK_K):
                    k = k0 + cols
                    kmask = k < GROUP
                    w = tl.load(w_rows + k[None, :], mask=row_mask[:, None] & kmask[None, :], other=0.0)
                    acc += w.to(tl.float32) * _prologue(x_ptr, aux_ptr, nw_ptr, k, kmask, rstd, PROLOGUE, K)[None, :]
            else:
                for k0 in range(0, GROUP, BLOCK_K):
                    k = g0 + k0 + cols
                    kmask = k0 + cols < GROUP
                    w = tl.load(w_rows + k[None, :], mask=row_mask[:, None] & kmask[None, :], other=0.0)
                    acc += w.to(tl.float32) * _prologue(x_ptr, aux_ptr, nw_ptr, k, kmask, rstd, PROLOGUE, K)[None, :]
        y = tl.sum(acc, axis=1)
        if HAS_SCALE:  # INT8 weight-only: int8 codes times a scale per output row
            y = y * tl.load(scale_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
        y = y.to(out_ptr.dtype.element_ty)
        if CONV_DIM > 0:  # rows [conv_lo, conv_lo + CONV_DIM) are conv channels: slide the window
            c = rows - conv_lo
            is_conv = row_mask & (c >= 0) & (c < CONV_DIM)
            j = tl.arange(0, BLOCK_W)
            win = conv_ptr + c[:, None] * (WC - 1) + j[None, :]
            prev = tl.load(win, mask=is_conv[:, None] & (j[None, :] < WC - 1), other=0.0)
            taps = tl.load(conv_w_ptr + c[:, None] * WC + j[None, :], mask=is_conv[:, None] & (j[None, :] < WC),
                           other=0.0).to(tl.float32)
            conv = tl.sum(prev.to(tl.float32) * taps, axis=1)
            last = tl.sum(tl.where(j[None, :] == WC - 1, taps, 0.0), axis=1)
            conv += y.to(tl.float32) * last
            if CONV_BIAS:
                conv += tl.load(conv_b_ptr + c, mask=is_conv, other=0.0).to(tl.float32)
            # the window moves one left: [s1 .. s_{W-2}, new]; each channel's row is this program's
            shifted = tl.load(win + 1, mask=is_conv[:, None] & (j[None, :] < WC - 2), other=0.0)
            shifted = tl.where(j[None, :] == WC - 2, y.to(prev.dtype)[:, None], shifted)
            tl.store(win, shifted, mask=is_conv[:, None] & (j[None, :] < WC - 1))
            y = tl.where(is_conv, (conv * tl.sigmoid(conv)).to(out_ptr.dtype.element_ty), y)
        tl.store(out_ptr + rows, y, mask=row_mask)

    @triton.jit
    def _ssm_step_kernel(xbc_ptr, dt_ptr, dt_bias_ptr, A_ptr, D_ptr, state_ptr, y_ptr,
                         P: tl.constexpr, N: tl.constexpr, HEADS_PER_GROUP: tl.constexpr,
                         D_INNER: tl.constexpr, GN: tl.constexpr, BLOCK_P: tl.constexpr, USE_PDL: tl.constexpr):
        """One head's rows [p0, p0 + BLOCK_P) of Mamba-2's recurrence for one token:
        state = state * exp(dt A) + dt x B^T; y = state C + D x (mamba_ssm's
        selective_state_update with dt_softplus, one row)."""
        h = tl.program_id(0)
        p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
        n = tl.arange(0, N)
        s_ptrs = state_ptr + (h * P + p[:, None]) * N + n[None, :]
        state = tl.load(s_ptrs)  # written one step ago by this kernel: safe before the wait
        if USE_PDL:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        g = h // HEADS_PER_GROUP
        x = tl.load(xbc_ptr + h * P + p).to(tl.float32)
        B = tl.load(xbc_ptr + D_INNER + g * N + n).to(tl.float32)
        C = tl.load(xbc_ptr + D_INNER + GN + g * N + n).to(tl.float32)
        dt = tl.load(dt_ptr + h).to(tl.float32) + tl.load(dt_bias_ptr + h).to(tl.float32)
        dt = tl.where(dt <= 20.0, tl.log(1.0 + tl.exp(dt)), dt)  # softplus
        state = state * tl.exp(dt * tl.load(A_ptr + h)) + (dt * x)[:, None] * B[None, :]
        tl.store(s_ptrs, state)
        y = tl.sum(state * C[None, :], axis=1) + tl.load(D_ptr + h).to(tl.float32) * x
        tl.store(y_ptr + h * P + p, y.to(y_ptr.dtype.element_ty))


def pdl_supported(device: torch.device) -> bool:
    """PDL needs sm90+ and a Triton with the `launch_pdl` option (3.4+)."""
    if INTERPRET or triton is None or device.type != "cuda":
        return False
    return _pdl_on(torch.cuda.get_device_capability(device))


@functools.cache
def _pdl_on(capability: tuple[int, int]) -> bool:
    if capability < (9, 0):
        return False
    from triton.backends.nvidia.compiler import CUDAOptions
    return "launch_pdl" in CUDAOptions.__dataclass_fields__ and hasattr(tl.extra.cuda, "gdc_wait")


def gemv_config(n: int, k: int) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps) for an (n, k) weight: the fastest whole step of the 1.3B
    preset among 13 tilings on an H200 (bench/RESULTS.md, session 13: 1.071 ms; 1.193 with
    half the rows, 1.39 with 16 rows for in_proj and gate|up). Replaced by the benchmark to
    compare others."""
    if INTERPRET:
        return 32, 32, 4
    block_k = min(2048, triton.next_power_of_2(k))
    return (4 if n <= 4096 else 8 if n <= 16384 else 16), block_k, 4


def gemv(x: torch.Tensor, weight: torch.Tensor, prologue: int = PLAIN, aux: torch.Tensor | None = None,
         norm: nn.Module | None = None, conv: tuple | None = None, pdl: bool = False,
         scale: torch.Tensor | None = None):
    """x (1, K) (or (1, 2K) for SILU_MUL) @ weight (N, K).T with `prologue` applied to x ->
    (out (1, N), the residual sum (1, K) for ADD_RMSNORM else None). An int8 weight comes
    with its `scale` (N,) (INT8 weight-only, platform/post/quantize.py's Int8Linear).

    aux: the residual (ADD_RMSNORM) or the gate z (GATED_RMSNORM; its first K values);
    norm: the RMSNorm / GatedRMSNorm module whose weight, eps (and group) apply;
    conv: (Mamba2Mixer, MambaState, first conv row) to run the conv update on those rows."""
    N, K = weight.shape
    assert x.shape[0] == 1 and x.stride(-1) == 1 and weight.stride(-1) == 1, "one contiguous row"
    assert x.shape[-1] == (2 * K if prologue == SILU_MUL else K)
    out = torch.empty(1, N, dtype=x.dtype, device=x.device)
    res_out = None
    if prologue == ADD_RMSNORM:
        res_out = torch.empty_like(aux)  # the sum keeps the residual's dtype
    group = getattr(norm, "group_size", K) if prologue == GATED_RMSNORM else K
    block_n, block_k, warps = gemv_config(N, K)
    if group != K:  # a gated norm of several groups: tiles never straddle two
        assert K % group == 0, f"norm groups of {group} do not divide {K}"
        while group % block_k:
            block_k //= 2
    conv_dim, wc, conv_args = 0, 2, (weight, weight, x)
    conv_lo, has_bias = 0, False
    if conv is not None:
        mixer, state, conv_lo = conv
        conv_dim, wc = mixer.conv_dim, mixer.cfg.mamba_d_conv
        assert state.conv.is_contiguous() and state.conv.shape[0] == 1
        has_bias = mixer.conv1d.bias is not None
        conv_args = (mixer.conv1d.weight, mixer.conv1d.bias if has_bias else weight, state.conv)
    launch = {"launch_pdl": True} if pdl else {}
    _gemv_kernel[(triton.cdiv(N, block_n),)](
        x, weight, out, x if aux is None else aux, out if res_out is None else res_out,
        weight if norm is None else norm.weight, *conv_args, weight if scale is None else scale, N, weight.stride(0),
        0.0 if norm is None else norm.eps, conv_lo,
        K=K, GROUP=group, PROLOGUE=prologue, HAS_SCALE=scale is not None, CONV_DIM=conv_dim, WC=wc,
        BLOCK_W=triton.next_power_of_2(wc), CONV_BIAS=has_bias, BLOCK_N=block_n, BLOCK_K=block_k,
        USE_PDL=pdl, num_warps=warps, **launch)
    return out, res_out


def ssm_step(zxbcdt: torch.Tensor, mixer: Mamba2Mixer, state, pdl: bool = False) -> torch.Tensor:
    """zxbcdt (1, d_inner + conv_dim + n_heads): in_proj's output with the conv already
    applied to xBC (`gemv` with conv) -> y (1, d_inner); the SSM state advances one token."""
    m = mixer
    xbc = zxbcdt[:, m.d_inner:]
    dt = zxbcdt[:, m.d_inner + m.conv_dim:]
    y = torch.empty(1, m.d_inner, dtype=zxbcdt.dtype, device=zxbcdt.device)
    block_p = min(16, m.head_dim)
    launch = {"launch_pdl": True} if pdl else {}
    _ssm_step_kernel[(m.n_heads, triton.cdiv(m.head_dim, block_p))](
        xbc, dt, m.dt_bias, state.A, m.D, state.ssm, y,
        P=m.head_dim, N=m.d_state, HEADS_PER_GROUP=m.n_heads // m.n_groups, D_INNER=m.d_inner,
        GN=m.n_groups * m.d_state, BLOCK_P=block_p, USE_PDL=pdl, num_warps=4, **launch)
    return y


def _pow2(n: int) -> bool:
    return n & (n - 1) == 0


def weight_of(linear) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(weight, scale or None) of a bias-free linear the fused GEMV reads: nn.Linear, or
    INT8 weight-only (int8 `weight`, a `scale` per row: Int8Linear); None otherwise (LoRA,
    INT4, float8, a bias). A `PackedLinears` group gives its packed weight."""
    if hasattr(linear, "packed"):  # a PackedLinears group (q|k|v, gate|up)
        weight = linear.packed()
        linear = linear.module if linear.module is not None else None
        if weight is None:
            return None
        if linear is None:
            return weight, None
    if getattr(linear, "bias", None) is not None:
        return None
    if type(linear) is nn.Linear:
        return linear.weight, None
    weight, scale = getattr(linear, "weight", None), getattr(linear, "scale", None)
    if (isinstance(weight, torch.Tensor) and weight.dtype == torch.int8 and isinstance(scale, torch.Tensor)
            and scale.shape == weight.shape[:1] and not hasattr(linear, "zero")):
        return weight, scale
    return None


def fusable(model, batch: int, device: torch.device) -> bool:
    """Whether `decode_step` applies: one row on a CUDA device with Triton (or the CPU under
    TRITON_INTERPRET, for tests), `model.fused_decode` on, one dtype throughout and no
    autocast, the model's kernel paths, and every layer still its own plain modules (a
    LoRA or quantized linear keeps the layer-by-layer step)."""
    if not (getattr(model, "fused_decode", True) and batch == 1 and triton is not None
            and (device.type == "cuda" or INTERPRET) and not torch.is_autocast_enabled("cuda")):
        return False
    dtype = model.embed_tokens.weight.dtype
    if type(model.lm_head) is not LMHead or model.lm_head.weight.dtype != dtype:
        return False

    def plain(*linears) -> bool:
        found = [weight_of(m) for m in linears]
        return all(f is not None and f[0].dtype in (dtype, torch.int8) and (f[1] is None or f[1].dtype == dtype)
                   for f in found)

    for block in model.layers:
        mixer, mlp = block.mixer, block.feed_forward
        if not (block.input_layernorm.use_kernel and plain(mlp.gate_up, mlp.down_proj)):
            return False
        if isinstance(mixer, Mamba2Mixer):
            if not (mixer.path(device) == "kernel" and plain(mixer.in_proj, mixer.out_proj)
                    and _pow2(mixer.d_state) and _pow2(mixer.head_dim)):
                return False
        elif not (isinstance(mixer, Attention) and plain(mixer.qkv, mixer.o_proj)
                  and mixer.use_kernel and decode_attention_supported(mixer.head_dim,
                                                                      mixer.n_heads // mixer.n_kv_heads)):
            return False
    return True


def decode_step(model, input_ids: torch.Tensor, cache, pdl: bool | None = None) -> torch.Tensor:
    """input_ids (1, 1) -> logits (1, 1, padded vocab); the cache advances by one token.
    The caller checks `fusable` first."""
    cache.check_room(1)
    if pdl is None:
        pdl = pdl_supported(input_ids.device)
    x, residual = model.embed_tokens(input_ids)[0], None  # (1, hidden)

    def matmul(x, linear, *args, **kw):
        weight, scale = weight_of(linear)
        return gemv(x, weight, *args, pdl=pdl, scale=scale, **kw)

    for block, state in zip(model.layers, cache.layers):
        mixer, norm1, h = block.mixer, block.input_layernorm, x
        prologue = RMSNORM if residual is None else ADD_RMSNORM
        if isinstance(mixer, Mamba2Mixer):
            zxbcdt, res = matmul(x, mixer.in_proj, prologue, residual, norm1, conv=(mixer, state, mixer.d_inner))
            y = ssm_step(zxbcdt, mixer, state, pdl)
            x, _ = matmul(y, mixer.out_proj, GATED_RMSNORM, zxbcdt, mixer.norm)
        else:
            qkv, res = matmul(x, mixer.qkv, prologue, residual, norm1)
            q = rope_cache_update(qkv, state.rope, state.offset, state.k, state.v, mixer.n_heads, mixer.head_dim,
                                  pdl=pdl)
            q = q.view(1, mixer.n_kv_heads, mixer.n_heads // mixer.n_kv_heads, mixer.head_dim)
            out = decode_attention(q, state.k, state.v, state.offset, pdl=pdl)
            x, _ = matmul(out.view(1, -1), mixer.o_proj)
        residual = h if res is None else res  # first layer: the embedding is the residual stream
        norm2, mlp = block.pre_ff_layernorm, block.feed_forward
        gate_up, residual = matmul(x, mlp.gate_up, ADD_RMSNORM, residual, norm2)
        x, _ = matmul(gate_up, mlp.down_proj, SILU_MUL)
    logits, _ = gemv(x, model.lm_head.weight, ADD_RMSNORM, residual, model.final_norm, pdl=pdl)
    cache.advance(1)
    return logits[:, None]
