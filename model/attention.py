"""Grouped-query attention (Ainslie et al. 2023) with partial RoPE.

Paths, chosen by `ModelConfig.attn_impl`:
- sdpa: `torch.nn.functional.scaled_dot_product_attention`; with no document mask it
  runs `is_causal=True`, which takes the FlashAttention backend on GPUs.
- flash: flash-attn's `flash_attn_func`, and `flash_attn_varlen_func` for packed
  documents (cu_seqlens from `seq_idx`), so documents never attend across a boundary
  without a dense mask.
- flex: as sdpa, but packed documents go through PyTorch's FlexAttention (compiled) with
  a block mask of the document boundaries: blocks wholly across a boundary are skipped,
  and the kernel never reads a (T, T) mask (one is built per forward to derive the block
  mask). `auto` takes it on GPUs without flash-attn, where SDPA with a dense document mask
  would fall off its flash kernels (Dong et al. 2024, "Flex Attention"). If compiling it
  fails, a warning says so and the dense-mask SDPA runs instead.
Decoding keeps keys/values in a static cache (`KVState`): buffers of `max_len` positions
allocated up front, written at a position held in a device tensor and read up to it (on
a GPU a flash-decoding kernel that reads the filled positions only, `model/kernels.py`;
elsewhere SDPA under a mask of them), so a decode step launches the same kernels on the
same memory every time and one CUDA graph serves every step (`mamba_slm.model.generation`).
Names match transformers' `BambaAttention` (q_proj, k_proj, v_proj, o_proj; no biases).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig
from .kernels import (decode_attention, decode_attention_ref, decode_attention_supported, rope_cache_update,
                      rope_cache_update_ref, triton)
from .layers import PackedLinears, RotaryEmbedding, apply_rotary

log = logging.getLogger(__name__)

try:
    from flash_attn import flash_attn_func, flash_attn_varlen_func
except Exception:  # noqa: BLE001 - optional GPU extension
    flash_attn_func = flash_attn_varlen_func = None

try:
    from torch.nn.attention.flex_attention import BlockMask, flex_attention
except ImportError:  # torch < 2.5
    BlockMask = flex_attention = None
_compiled_flex = None
_mask_memo: tuple = ()  # (seq_idx, its version, block mask): one mask per forward, not per layer


@dataclass
class KVState:
    """Static decoding cache of one attention layer.

    Keys (after RoPE) and values sit at positions [0, offset) of buffers of `max_len`
    positions; `offset` is the cache's shared device counter (`InferenceCache.offset`),
    advanced once per forward by the model, not here. The buffers start zeroed so that
    masked-out positions hold finite values (0 x NaN would leak through the softmax).
    """
    k: torch.Tensor             # (B, kv_heads, max_len, head_dim)
    v: torch.Tensor             # (B, kv_heads, max_len, head_dim)
    offset: torch.Tensor        # (1,) int64: tokens already cached, shared by all layers
    rope: torch.Tensor          # (max_len, 2, rotary_dim) float32: cos and sin per position

    def reset(self) -> None:
        self.k.zero_()
        self.v.zero_()


def resolve_attn_impl(requested: str, device: torch.device) -> str:
    has_flash = flash_attn_func is not None and device.type == "cuda"
    if requested == "flash" and not has_flash:
        raise RuntimeError("attn_impl='flash' needs flash-attn and a CUDA device; use attn_impl='sdpa'")
    if requested == "flex" and flex_attention is None:
        raise RuntimeError("attn_impl='flex' needs torch>=2.5 (FlexAttention); use attn_impl='sdpa'")
    if requested == "auto":
        if has_flash:
            return "flash"
        return "flex" if device.type == "cuda" and flex_attention is not None else "sdpa"
    return requested


def document_block_mask(seq_idx: torch.Tensor):
    """(B, T) document ids -> FlexAttention BlockMask of `document_causal_mask`, built once
    per seq_idx tensor (every attention layer of a forward, and its recomputation, reuse it)."""
    global _mask_memo
    memo = not seq_idx.is_inference()  # inference tensors have no version counter
    if memo and _mask_memo and _mask_memo[0] is seq_idx and _mask_memo[1] == seq_idx._version:
        return _mask_memo[2]
    mask = build_document_block_mask(seq_idx)
    _mask_memo = (seq_idx, seq_idx._version, mask) if memo else ()
    return mask


def build_document_block_mask(seq_idx: torch.Tensor, block: int = 128):
    """The BlockMask of `document_causal_mask`, built from 128-token blocks' document ranges:
    a key block is skipped where its ids [lo, hi] cannot meet the query block's, full where
    both blocks hold one and the same document and the keys come first, partial (the
    mask_mod decides per token) otherwise. Exact for any seq_idx (ids need not increase:
    disjoint ranges share no id), and O((T / 128)^2): create_block_mask evaluated the mask
    at every (b, q, kv), 20 GB at T = 32K, batch 2, or a ~50 s torch.compile on a GPU
    (bench/bench_block_mask.py)."""
    B, T = seq_idx.shape
    nb = -(-T // block)
    pad = nb * block - T  # the last block's padding repeats the last id: ranges stay tight
    ids = torch.cat([seq_idx, seq_idx[:, -1:].expand(B, pad)], dim=1).view(B, nb, block)
    lo, hi = ids.amin(-1), ids.amax(-1)  # (B, nb)
    q_lo, q_hi, k_lo, k_hi = lo[:, :, None], hi[:, :, None], lo[:, None, :], hi[:, None, :]
    causal = torch.ones(nb, nb, dtype=torch.bool, device=seq_idx.device).tril()
    meet = causal & (k_lo <= q_hi) & (q_lo <= k_hi)  # (B, nb q-blocks, nb kv-blocks)
    full = meet & (q_lo == q_hi) & (k_lo == k_hi) & (q_lo == k_lo) & causal.tril(-1)
    if pad:  # the padded last query block never counts as full (flex_attention masks past T)
        full[:, -1, :] = False
    partial = meet & ~full

    def ordered(dense: torch.Tensor):  # (B, nb, nb) -> counts (B, 1, nb), indices (B, 1, nb, nb)
        dense = dense.to(torch.int32)[:, None]
        return dense.sum(-1, dtype=torch.int32), torch.argsort(dense, dim=-1, descending=True, stable=True).to(torch.int32)

    def same_document_causal(b, h, q, kv):
        return (q >= kv) & (seq_idx[b, q] == seq_idx[b, kv])

    return BlockMask.from_kv_blocks(*ordered(partial), *ordered(full), BLOCK_SIZE=block,
                                    mask_mod=same_document_causal, seq_lengths=(T, T))


def document_causal_mask(seq_idx: torch.Tensor) -> torch.Tensor:
    """(B, T) document ids -> (B, 1, T, T) bool, True where query t may attend key s."""
    T = seq_idx.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=seq_idx.device).tril()
    return (causal & (seq_idx[:, :, None] == seq_idx[:, None, :]))[:, None]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.n_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.hidden_size, bias=False)
        self.o_proj._is_residual_proj = True
        self.rotary = RotaryEmbedding(cfg.rotary_dim, cfg.rope_theta, cfg.rope_scaling, cfg.max_seq_len)
        self.qkv = PackedLinears(self, ("q_proj", "k_proj", "v_proj"))  # one GEMV per decode step
        self.use_kernel = True  # Triton decode glue on a GPU; the model clears it for ssm_path="reference"
        self._impl: str | None = None

    def impl(self, device: torch.device) -> str:
        if self._impl is None:
            self._impl = resolve_attn_impl(self.cfg.attn_impl, device)
            log.info("attention path: %s (attn_impl=%s)", self._impl, self.cfg.attn_impl)
        return self._impl

    def new_state(self, batch: int, max_len: int, offset: torch.Tensor, device, dtype) -> KVState:
        shape = (batch, self.n_kv_heads, max_len, self.head_dim)
        positions = torch.arange(max_len, device=device)
        # The same cos/sin as the cacheless path computes for these positions.
        cos, sin = self.rotary(positions)
        return KVState(k=torch.zeros(shape, device=device, dtype=dtype),
                       v=torch.zeros(shape, device=device, dtype=dtype), offset=offset,
                       rope=torch.stack([cos, sin], dim=1))

    def forward(self, x: torch.Tensor, seq_idx: torch.Tensor | None = None,
                state: KVState | None = None, valid_len: torch.Tensor | None = None,
                start: int = 0) -> torch.Tensor:
        """x (B, T, hidden) -> (B, T, hidden). With `state`: continue from the cache, whose
        host-side count of cached tokens is `start` (`InferenceCache.seqlen`: no device read).
        Right padding (`valid_len`) needs nothing here: causal attention keeps real tokens
        from seeing it, and its keys sit past the cache's offset, where the next steps
        overwrite them."""
        b, T, _ = x.shape
        if state is not None and T == 1 and valid_len is None:
            return self.o_proj(self._decode_step(x, state))
        q = self.q_proj(x).view(b, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = self.k_proj(x).view(b, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if state is not None:
            out = self._prefill(q, k, v, state, start)
        else:
            cos, sin = self.rotary(torch.arange(T, device=x.device))
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
            impl = self.impl(x.device)
            if impl == "flash":
                out = self._flash(q, k, v, seq_idx)
            elif impl == "flex" and seq_idx is not None and (q.is_cuda or not torch.is_grad_enabled()):
                out = self._flex(q, k, v, seq_idx)  # (FlexAttention has no backward on a CPU)
            else:
                out = self._sdpa(q, k, v, seq_idx, 0)
            out = out.transpose(1, 2).reshape(b, T, -1)
        return self.o_proj(out)

    def _prefill(self, q, k, v, state: KVState, start: int) -> torch.Tensor:
        """Several tokens into the cache (a prompt, or a chunk continuing one) at position `start`."""
        b, _, T, _ = q.shape
        cos, sin = state.rope[start:start + T].unbind(1)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        state.k[:, :, start:start + T] = k
        state.v[:, :, start:start + T] = v
        if start == 0:  # nothing cached before: plain causal attention over the prompt
            out = self._flash(q, k, v, None) if self.impl(q.device) == "flash" else self._sdpa(q, k, v, None, 0)
        else:
            out = self._sdpa(q, state.k[:, :, :start + T], state.v[:, :, :start + T], None, start)
        return out.transpose(1, 2).reshape(b, T, -1)

    def _decode_step(self, x: torch.Tensor, state: KVState) -> torch.Tensor:
        """One token per row (x (B, 1, hidden)) at position `state.offset`; no host sync,
        fixed shapes. One matmul for q|k|v when packed, then RoPE and the cache writes in
        one Triton kernel on a GPU (`rope_cache_update`), PyTorch otherwise."""
        b = x.shape[0]
        qkv = self.qkv(x[:, 0])
        if qkv is None:
            qkv = torch.cat([self.q_proj(x[:, 0]), self.k_proj(x[:, 0]), self.v_proj(x[:, 0])], dim=-1)
        kernels = self.decode_kernels(x.device)
        update = rope_cache_update if kernels else rope_cache_update_ref
        q = update(qkv, state.rope, state.offset, state.k, state.v, self.n_heads, self.head_dim)  # (B, H, D)
        # GQA without repeating keys: the n_heads / n_kv_heads query heads of a group
        # (consecutive heads, as `enable_gqa` groups them) become that many queries
        # against the group's one key/value head.
        q = q.reshape(b, self.n_kv_heads, self.n_heads // self.n_kv_heads, self.head_dim)
        if self.reads_filled_cache_only(x.device):
            out = decode_attention(q, state.k, state.v, state.offset)
        else:
            out = decode_attention_ref(q, state.k, state.v, state.offset)
        return out.reshape(b, 1, self.n_heads * self.head_dim)

    def decode_kernels(self, device: torch.device) -> bool:
        """Whether a decode step runs this project's Triton kernels (a GPU with triton)."""
        return self.use_kernel and triton is not None and device.type == "cuda"

    def reads_filled_cache_only(self, device: torch.device) -> bool:
        """Whether a decode step reads only the filled cache positions (the decode-attention
        kernel), so that its cost does not grow with the cache's `max_len`."""
        return self.decode_kernels(device) and decode_attention_supported(self.head_dim,
                                                                          self.n_heads // self.n_kv_heads)

    def _sdpa(self, q, k, v, seq_idx, offset: int) -> torch.Tensor:
        T, S = q.shape[2], k.shape[2]
        if seq_idx is not None:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=document_causal_mask(seq_idx),
                                                  enable_gqa=True)
        if offset == 0:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        # Continuing from a cache: query t sits at position offset + t.
        mask = torch.arange(S, device=q.device)[None, :] <= (offset + torch.arange(T, device=q.device))[:, None]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)

    def _flex(self, q, k, v, seq_idx) -> torch.Tensor:
        """Packed documents through FlexAttention: compiled on a GPU (its Triton kernel),
        eager elsewhere (a reference implementation, for tests)."""
        global _compiled_flex
        if not q.is_cuda:
            return flex_attention(q, k, v, block_mask=document_block_mask(seq_idx), enable_gqa=True)
        if _compiled_flex is None:
            _compiled_flex = torch.compile(flex_attention, dynamic=False)
        if _compiled_flex is not flex_attention:
            try:
                return _compiled_flex(q, k, v, block_mask=document_block_mask(seq_idx), enable_gqa=True)
            except Exception as exc:  # noqa: BLE001 - e.g. no C compiler for Triton's launcher
                log.warning("compiling FlexAttention failed (%r); packed documents use SDPA with a "
                            "dense mask from now on (slower; flash-attn or attn_impl='sdpa' avoid it)", exc)
                _compiled_flex = flex_attention  # marks the failure: never retried
        return self._sdpa(q, k, v, seq_idx, 0)

    def _flash(self, q, k, v, seq_idx) -> torch.Tensor:
        """flash-attn wants (B, T, H, D) in fp16/bf16."""
        orig = q.dtype
        dtype = orig if orig in (torch.float16, torch.bfloat16) else torch.bfloat16
        q, k, v = (t.transpose(1, 2).to(dtype) for t in (q, k, v))
        b, T = q.shape[:2]
        if seq_idx is None:
            out = flash_attn_func(q, k, v, causal=True)
        else:
            # Each (row, document) is one sequence; rows are laid end to end.
            flat = (seq_idx + torch.arange(b, device=q.device)[:, None] * (T + 1)).flatten()
            starts = torch.ones_like(flat, dtype=torch.bool)
            starts[1:] = flat[1:] != flat[:-1]
            cu = F.pad(torch.nonzero(starts).flatten().to(torch.int32), (0, 1), value=b * T)
            max_len = int((cu[1:] - cu[:-1]).max())
            out = flash_attn_varlen_func(q.reshape(b * T, *q.shape[2:]), k.reshape(b * T, *k.shape[2:]),
                                         v.reshape(b * T, *v.shape[2:]), cu, cu, max_len, max_len,
                                         causal=True).view(b, T, *q.shape[2:])
        return out.transpose(1, 2).to(orig)
