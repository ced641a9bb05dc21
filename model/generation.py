"""Autoregressive sampling with the per-layer inference cache.

The prompt runs once through the full (chunked) path, filling Mamba-2 conv/SSM states
and attention KV caches; each new token then costs one recurrent step per Mamba-2 layer
and one cached attention read per attention layer.
"""
from __future__ import annotations

import torch


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's penalty (Keskar et al. 2019): divide positive logits of seen tokens by
    `penalty`, multiply negative ones. logits (B, V), seen (B, S) token ids."""
    if penalty == 1.0:
        return logits
    picked = logits.gather(1, seen)
    picked = torch.where(picked > 0, picked / penalty, picked * penalty)
    return logits.scatter(1, seen, picked)


def filter_top_k_top_p(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Keep the k most likely tokens and the smallest set whose mass reaches top_p
    (nucleus sampling, Holtzman et al. 2020); the rest get -inf."""
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= top_p  # mass before this token already enough
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(1, order, sorted_logits)
    return logits


def sample_next(logits: torch.Tensor, seen: torch.Tensor, temperature: float = 1.0, top_k: int = 0,
                top_p: float = 1.0, repetition_penalty: float = 1.0,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """logits (B, V) -> next ids (B,). temperature 0 is greedy."""
    logits = apply_repetition_penalty(logits.float(), seen, repetition_penalty)
    if temperature <= 0:
        return logits.argmax(-1)
    logits = filter_top_k_top_p(logits / temperature, top_k, top_p)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model, input_ids: torch.Tensor, max_new_tokens: int = 32, temperature: float = 1.0,
             top_k: int = 0, top_p: float = 1.0, repetition_penalty: float = 1.0,
             eos_id: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """input_ids (B, T) -> (B, T + new) ids. Rows that emit `eos_id` keep emitting it."""
    vocab = model.config.vocab_size
    cache = model.new_cache(input_ids.shape[0])
    logits = model(input_ids, cache=cache).logits[:, -1, :vocab]
    out = input_ids
    done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    for _ in range(max_new_tokens):
        nxt = sample_next(logits, out, temperature, top_k, top_p, repetition_penalty, generator)
        if eos_id is not None:
            nxt = torch.where(done, torch.full_like(nxt, eos_id), nxt)
            done |= nxt == eos_id
        out = torch.cat([out, nxt[:, None]], dim=1)
        if eos_id is not None and bool(done.all()):
            break
        logits = model(nxt[:, None], cache=cache).logits[:, -1, :vocab]
    return out
