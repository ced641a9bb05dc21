"""Evaluate a model beyond its training context.

Attention layers get RoPE scaling at load time (`ModelConfig.rope_scaling`, implemented in
`mamba_slm.model.layers.rope_inv_freq`): linear position interpolation (Chen et al. 2023),
NTK-aware base scaling (bloc97 2023) or YaRN (Peng et al. 2023), with
factor = target context / trained context. Mamba-2 layers need nothing: the SSD scan has
no positional limit (its chunked reference pads to whole chunks).

`max_seq_len` stays the trained length on purpose: YaRN reads it as the original context
when it splits frequencies into interpolated and extrapolated bands.

Perplexity on long documents: each document is cut into non-overlapping windows of
`context` inputs (+1 target); every window is one full forward pass, and the loss is
reported overall and per position bucket (by default one bucket per trained length), so
the tokens past the trained context are visible on their own.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F

from mamba_slm.model.io import load_config

from .loading import LoadedModel, load_model_dir

SCALING_TYPES = ("none", "linear", "ntk", "yarn")


def rope_scaling_for(trained_len: int, context: int, kind: str) -> dict | None:
    """The `ModelConfig.rope_scaling` value that stretches `trained_len` to `context`
    (None when no scaling is asked or needed)."""
    if kind not in SCALING_TYPES:
        raise ValueError(f"rope scaling {kind!r}: expected one of {SCALING_TYPES}")
    if kind == "none" or context <= trained_len:
        return None
    return {"type": kind, "factor": context / trained_len}


def load_long_context(path: str | Path, context: int, scaling: str = "yarn") -> LoadedModel:
    """Load a model directory with RoPE scaled from its trained context to `context`."""
    trained = load_config(path).max_seq_len
    return load_model_dir(path, rope_scaling=rope_scaling_for(trained, context, scaling))


def tokenize_documents(tokenizer, texts: Iterable[str], eos_id: int) -> list[torch.Tensor]:
    """One id tensor per document, EOS-terminated like the curated data."""
    return [torch.tensor(tokenizer.encode(t).ids + [eos_id], dtype=torch.long) for t in texts]


def _windows(documents: Sequence[torch.Tensor], context: int) -> torch.Tensor:
    """(N, context + 1): every full window of every document."""
    rows = [doc[i: i + context + 1] for doc in documents
            for i in range(0, len(doc) - context, context)]
    if not rows:
        longest = max((len(d) for d in documents), default=0)
        raise ValueError(f"no document has the {context + 1} tokens a window of context {context} needs "
                         f"(longest: {longest}); use longer documents or a smaller --context")
    return torch.stack(rows)


@torch.no_grad()
def long_document_perplexity(model, documents: Sequence[torch.Tensor], context: int,
                             bucket: int | None = None, batch_size: int = 1,
                             max_windows: int | None = None) -> dict:
    """Next-token loss of `model` over windows of `context` tokens.

    Returns {"context", "loss", "ppl", "tokens", "windows", "by_position": [{"start",
    "end", "loss", "ppl"}]}; `bucket` (default: the model's max_seq_len) is the width of
    a position bucket."""
    cfg = model.config
    bucket = bucket or cfg.max_seq_len
    windows = _windows(documents, context)
    if max_windows is not None:
        windows = windows[:max_windows]
    device = next(model.parameters()).device
    sums = torch.zeros(context, dtype=torch.float64)  # loss summed per position
    for start in range(0, len(windows), batch_size):
        batch = windows[start: start + batch_size].to(device)
        logits = model(batch[:, :-1]).logits[..., : cfg.vocab_size].float()  # (B, T, V)
        loss = F.cross_entropy(logits.transpose(1, 2), batch[:, 1:], reduction="none")  # (B, T)
        sums += loss.sum(0).double().cpu()
    n = len(windows)
    buckets = []
    for lo in range(0, context, bucket):
        hi = min(lo + bucket, context)
        mean = (sums[lo:hi].sum() / (n * (hi - lo))).item()
        buckets.append({"start": lo, "end": hi, "loss": mean, "ppl": math.exp(mean)})
    mean = (sums.sum() / (n * context)).item()
    return {"context": context, "loss": mean, "ppl": math.exp(mean), "tokens": n * context,
            "windows": n, "by_position": buckets}


def evaluate_long_context(path: str | Path, texts: Sequence[str], context: int,
                          scalings: Sequence[str] = ("none", "yarn"), max_windows: int | None = None) -> dict:
    """Perplexity at the trained context (the reference) and at `context` with each RoPE
    scaling in `scalings`, over the same tokens. `max_windows` caps the long windows;
    the reference then reads the same leading tokens."""
    trained = load_config(path).max_seq_len
    plain = load_model_dir(path)
    docs = tokenize_documents(plain.tokenizer, texts, plain.eos_id)
    ref_windows = None if max_windows is None else max_windows * max(1, context // trained)
    runs = [{"rope_scaling": "none", **long_document_perplexity(plain.model, docs, trained,
                                                                 max_windows=ref_windows)}]
    for kind in scalings:
        model = load_long_context(path, context, kind).model
        run = long_document_perplexity(model, docs, context, bucket=trained, max_windows=max_windows)
        runs.append({"rope_scaling": model.config.rope_scaling or "none", **run})
    return {"trained_context": trained, "context": context, "runs": runs}
