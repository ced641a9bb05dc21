"""The hybrid language model: a stack of pre-norm blocks, each a mixer (Mamba-2 or
attention, per `ModelConfig.layer_pattern`) followed by a SwiGLU MLP.

Block:  h = x + mixer(input_layernorm(x));  out = h + feed_forward(pre_ff_layernorm(h))
(the layout of transformers' `BambaDecoderLayer`, so weights map one to one).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .attention import Attention
from .config import ATTENTION, ModelConfig
from .layers import RMSNorm, SwiGLU
from .loss import LMHead
from .mamba2 import Mamba2Mixer


@dataclass
class InferenceCache:
    """Per-layer decoding state (MambaState or KVState) for up to `max_len` tokens a row.

    Every buffer is allocated here and updated in place, and the position of the next
    token is a device tensor (`offset`), so the decode step's kernels read and write the
    same memory at every step: the precondition for replaying it as one CUDA graph.
    `seqlen` is the same count on the host, for checks that must not sync the device.
    """
    layers: list
    max_len: int
    offset: torch.Tensor  # (1,) int64 on the model's device, shared with every KVState
    seqlen: int = 0

    def check_room(self, n: int) -> None:
        if self.seqlen + n > self.max_len:
            raise ValueError(
                f"the inference cache holds max_len={self.max_len} tokens per row and has "
                f"{self.seqlen}; {n} more do not fit. Make it with "
                f"model.new_cache(batch, max_len=prompt + new tokens)")

    def advance(self, n: int, real: torch.Tensor | None = None) -> None:
        """n tokens went in; `real` (a device count) of them are tokens, the rest right
        padding: the device offset moves by `real`, the host count by n (the caller, who
        knows the real count on the host, sets `seqlen`)."""
        self.seqlen += n
        self.offset.add_(n if real is None else real)

    def reset(self) -> None:
        """Empty the cache in place (same buffers), ready for a new prompt."""
        for state in self.layers:
            state.reset()
        self.offset.zero_()
        self.seqlen = 0


@dataclass
class LMOutput:
    logits: torch.Tensor | None
    loss: torch.Tensor | None = None
    cache: InferenceCache | None = None
    hidden: torch.Tensor | None = None  # the final-normed hidden states, with output_hidden=True


class Block(nn.Module):
    """One layer: either mixer behind the same forward(x, seq_idx, state) interface.

    The residual stream travels beside the block output, as in mamba-ssm's `Block`:
    forward(hidden, residual) -> (feed_forward output, residual), and each residual add
    happens inside the next RMSNorm (`RMSNorm(x, residual)`, one fused kernel on a GPU),
    so a layer launches no separate add kernels. The sum is the same as the
    `h = x + mixer(norm(x)); out = h + ff(norm(h))` of the docstring above.
    """

    def __init__(self, cfg: ModelConfig, kind: str):
        super().__init__()
        self.kind = kind
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.mixer = Attention(cfg) if kind == ATTENTION else Mamba2Mixer(cfg)
        self.pre_ff_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.feed_forward = SwiGLU(cfg.hidden_size, cfg.mlp_hidden_size)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None,
                seq_idx: torch.Tensor | None = None, state=None, **cache_args) -> tuple[torch.Tensor, torch.Tensor]:
        """x: the previous block's output (the embedding for the first block, with
        residual None) -> (this block's MLP output, the residual stream before it).
        cache_args (valid_len, start) go to the mixer with its state (`HybridLM.forward`)."""
        if residual is None:
            normed, residual = self.input_layernorm(x), x
        else:
            normed, residual = self.input_layernorm(x, residual)
        mixed = self.mixer(normed, seq_idx=seq_idx, state=state, **cache_args)
        normed, residual = self.pre_ff_layernorm(mixed, residual)
        return self.feed_forward(normed), residual


class HybridLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        V = cfg.padded_vocab_size
        self.embed_tokens = nn.Embedding(V, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, kind) for kind in cfg.layer_pattern)
        self.final_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.lm_head = LMHead(cfg.hidden_size, V)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.gradient_checkpointing = False
        self.fused_decode = True  # batch-1 decode steps on a GPU: model/fused_decode.py
        if cfg.ssm_path == "reference":
            for module in self.modules():
                if isinstance(module, (RMSNorm, Attention)):
                    module.use_kernel = False
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Normal(0, init_std) for projections and embeddings; residual output projections
        scaled by 1/sqrt(2 * n_layers) (GPT-2, Radford et al. 2019); Mamba-2's dt_bias,
        A_log, D keep their own init (see `Mamba2Mixer.reset_ssm_parameters`)."""
        std = self.config.init_std
        residual_std = std / math.sqrt(2 * self.config.n_layers)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, 0.0, residual_std if getattr(module, "_is_residual_proj", False) else std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, 0.0, std)

    def packed_groups(self):
        """The `PackedLinears` of every layer: q|k|v of attention, gate|up of each MLP."""
        for module in self.modules():
            if isinstance(module, SwiGLU):
                yield module.gate_up
            elif isinstance(module, Attention):
                yield module.qkv

    @torch.no_grad()
    def pack_for_decoding(self) -> None:
        """Pack q|k|v and gate|up weights for one matmul each (see `PackedLinears`); done by
        the decoders on a GPU, where a batch-1 step is a chain of GEMVs. A no-op for
        modules already packed, or swapped for LoRA/quantized ones."""
        for group in self.packed_groups():
            group.pack()

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each block's activations in backward (one checkpoint per block)."""
        self.gradient_checkpointing = enabled

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())  # tied weights are counted once
        if exclude_embeddings:
            n -= self.embed_tokens.weight.numel()
        return n

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6 N + 12 * attention layers * hidden * seq_len
        (Kaplan et al. 2020 / PaLM appendix B, the convention of the benchmarks)."""
        n_attn = self.config.layer_pattern.count(ATTENTION)
        return 6 * self.num_parameters() + 12 * n_attn * self.config.hidden_size * seq_len

    def new_cache(self, batch: int, max_len: int | None = None, device=None, dtype=None) -> InferenceCache:
        """A decoding cache for `batch` rows of up to `max_len` tokens each (prompt and
        generated; default `config.max_seq_len`). Attention layers preallocate
        2 x batch x kv_heads x max_len x head_dim values; Mamba-2 layers a fixed state."""
        max_len = max_len or self.config.max_seq_len
        device = device or self.embed_tokens.weight.device
        dtype = dtype or self.embed_tokens.weight.dtype
        offset = torch.zeros(1, dtype=torch.long, device=device)
        return InferenceCache([blk.mixer.new_state(batch, max_len, offset, device, dtype) for blk in self.layers],
                              max_len=max_len, offset=offset)

    def forward(self, input_ids: torch.Tensor, seq_idx: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, cache: InferenceCache | None = None,
                return_logits: bool = True, valid_len: torch.Tensor | None = None,
                output_hidden: bool = False) -> LMOutput:
        """input_ids (B, T) -> LMOutput(logits (B, T, V_padded), loss, cache).

        With labels and return_logits=False, the loss is computed chunk by chunk and no
        logits are returned (the training path: saves the (B*T, V) fp32 logits).

        seq_idx (B, T): document index per token (non-decreasing); no information flows
        between documents. labels (B, T): targets aligned with input_ids (already shifted),
        -100 ignored. cache: continue decoding from (and update) an `InferenceCache`.
        output_hidden: return the final-normed hidden states (B, T, hidden) instead of logits,
        for callers that project them in chunks (long-context evaluation).

        valid_len ((1,) int64 device tensor, with a cache): the rows are right-padded and
        only their first valid_len tokens are real (every row the same): the padding changes
        no state, the cache's device offset advances by valid_len (its host count
        `seqlen` by T: the caller, who knows the real count, sets it), and the logits are
        those of the last real token only, (B, 1, V). A prompt padded to a few fixed
        lengths can so run as a captured CUDA graph (`generation.Decoder.prefill`).
        """
        cache_args = {}
        if cache is not None:
            if seq_idx is not None:
                raise ValueError("seq_idx (packed documents) is for training; decode one document per row")
            cache.check_room(input_ids.shape[1])
            cache_args = dict(valid_len=valid_len, start=cache.seqlen)  # start: no device read per layer
        h, residual = self.embed_tokens(input_ids), None  # (B, T, hidden)
        for i, block in enumerate(self.layers):
            state = None if cache is None else cache.layers[i]
            if self.gradient_checkpointing and self.training and cache is None:
                h, residual = checkpoint(block, h, residual, seq_idx, use_reentrant=False)
            else:
                h, residual = block(h, residual, seq_idx=seq_idx, state=state, **cache_args)
        if cache is not None and valid_len is not None:
            last = (valid_len - 1).clamp(min=0)
            h, residual = h.index_select(1, last), residual.index_select(1, last)
        h = self.final_norm(h, residual)[0]
        if cache is not None:
            cache.advance(input_ids.shape[1], valid_len)
        if output_hidden:
            return LMOutput(logits=None, cache=cache, hidden=h)
        if labels is not None and not return_logits:
            return LMOutput(logits=None, loss=self.chunked_loss(h, labels), cache=cache)
        logits = self.lm_head(h)  # (B, T, V_padded)
        loss = None
        if labels is not None:  # per label; 0 when every label is ignored, as chunked_loss gives
            loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100,
                                   reduction="sum") / (labels != -100).sum().clamp(min=1)
        return LMOutput(logits=logits, loss=loss, cache=cache)

    def chunked_loss(self, h: torch.Tensor, labels: torch.Tensor, chunk_tokens: int = 4096) -> torch.Tensor:
        """Mean cross-entropy without materialising (B*T, V) logits: the vocabulary
        projection and loss run per chunk of tokens, so peak memory holds one chunk's fp32
        logits (Liger/Unsloth-style chunked CE). The model's own head (`LMHead`, also when
        ZeRO-3 partitions it) computes the chunk gradients in its forward
        (`loss.linear_cross_entropy`); a head swapped for another module (LoRA) goes through
        that module's forward per chunk, recomputed in backward."""
        h, labels = h.flatten(0, 1), labels.flatten()
        if type(self.lm_head) is LMHead:
            total = self.lm_head(h, labels, chunk_tokens)
        else:
            total = h.new_zeros((), dtype=torch.float32)
            for h_c, y_c in zip(h.split(chunk_tokens), labels.split(chunk_tokens)):
                total = total + checkpoint(self._ce_sum, h_c, y_c, use_reentrant=False)
        return total / (labels != -100).sum().clamp(min=1)

    def _ce_sum(self, h: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(h)
        return F.cross_entropy(logits.float(), labels, ignore_index=-100, reduction="sum")

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int = 32, **sampling) -> torch.Tensor:
        from .generation import generate
        return generate(self, input_ids, max_new_tokens=max_new_tokens, **sampling)
