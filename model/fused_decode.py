"""The batch-1 decode step with each layer's norms and activation folded into its matmuls.

A decode step at batch 1 reads every weight once, in GEMVs; what costs beyond that is the
number of kernels, each a few microseconds however little it does. The layer-by-layer
step (`HybridLM.forward` with a cache) launches per Mamba-2 layer: add + RMSNorm, in_proj,
conv update, state update, gated RMSNorm, out_proj, add + RMSNorm, gate|up, silu * up,
down (cuBLAS splits some GEMVs in two). Here the norms and SwiGLU's activation run inside
the GEMV that consumes them (`kernels.rmsnorm_gemv`, `gated_rmsnorm_gemv`,
`silu_mul_gemv`), so a Mamba-2 layer is six launches:

    in_proj(norm(x + res)) -> conv update -> state update -> out_proj(gated_norm(y, z))
    -> gate|up(norm(. + res)) -> down(silu(g) * u)

and an attention layer is q|k|v(norm(x + res)) -> RoPE + cache write -> attention -> o_proj
-> the same two MLP launches. The model's weights are used as they are (q|k|v and gate|up
packed, `HybridLM.pack_for_decoding`); the rounding points are those of the unfused step.

`fusable(model, input_ids, cache)` says when it applies: one token of one row on a CUDA
device with Triton, the kernel paths in use, no autograd or autocast, and every layer
still the model's own plain modules (a LoRA or quantized linear falls back to the
layer-by-layer step). `HybridLM.fused_decode = False` turns it off (the benchmarks compare).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from . import kernels
from .attention import Attention
from .loss import LMHead
from .mamba2 import Mamba2Mixer


def _plain(*linears: nn.Module) -> bool:
    return all(type(m) is nn.Linear and m.bias is None for m in linears)


def fusable(model, input_ids: torch.Tensor, cache) -> bool:
    if not (getattr(model, "fused_decode", False) and cache is not None and input_ids.shape == (1, 1)
            and input_ids.is_cuda and kernels.triton is not None and not torch.is_grad_enabled()
            and not torch.is_autocast_enabled("cuda")):
        return False
    dtype = model.embed_tokens.weight.dtype
    if type(model.lm_head) is not LMHead or model.lm_head.weight.dtype != dtype:
        return False
    for block in model.layers:
        mixer, mlp = block.mixer, block.feed_forward
        if not (block.input_layernorm.use_kernel and mlp.gate_up.packed() is not None and _plain(mlp.down_proj)):
            return False
        if isinstance(mixer, Mamba2Mixer):
            if mixer.path(input_ids.device) != "kernel" or not _plain(mixer.in_proj, mixer.out_proj):
                return False
        elif not (isinstance(mixer, Attention) and mixer.qkv.packed() is not None and _plain(mixer.o_proj)):
            return False
    return True


def decode_step(model, input_ids: torch.Tensor, cache) -> torch.Tensor:
    """input_ids (1, 1) -> logits (1, 1, padded vocab); the cache advances by one token."""
    cache.check_room(1)
    x, residual = model.embed_tokens(input_ids)[0], None  # (1, hidden)
    for block, state in zip(model.layers, cache.layers):
        mixer, norm1 = block.mixer, block.input_layernorm
        if isinstance(mixer, Mamba2Mixer):
            zxbcdt, residual = kernels.rmsnorm_gemv(x, residual, norm1.weight, norm1.eps, mixer.in_proj.weight)
            z, xBC, dt = zxbcdt.split([mixer.d_inner, mixer.conv_dim, mixer.n_heads], dim=-1)
            y = mixer.ssm_step(xBC, dt, state)
            x = kernels.gated_rmsnorm_gemv(y, z.contiguous(), mixer.norm.weight, mixer.norm.eps,
                                           mixer.norm.group_size, mixer.out_proj.weight)
        else:
            qkv, residual = kernels.rmsnorm_gemv(x, residual, norm1.weight, norm1.eps, mixer.qkv.packed())
            x = kernels.gemv(mixer.attend_step(qkv, state), mixer.o_proj.weight)
        norm2, mlp = block.pre_ff_layernorm, block.feed_forward
        gate_up, residual = kernels.rmsnorm_gemv(x, residual, norm2.weight, norm2.eps, mlp.gate_up.packed())
        x = kernels.silu_mul_gemv(gate_up, mlp.down_proj.weight)
    norm = model.final_norm
    logits, _ = kernels.rmsnorm_gemv(x, residual, norm.weight, norm.eps, model.lm_head.weight)
    cache.advance(1)
    return logits[:, None]
