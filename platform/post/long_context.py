"""Evaluate a model beyond its training context.

Attention layers get RoPE scaling at load time (`ModelConfig.rope_scaling`, implemented in
`mamba_slm.model.layers.rope_inv_freq`): linear position interpolation (Chen et al. 2023),
NTK-aware base scaling (bloc97 2023) or YaRN (Peng et al. 2023), with
factor = target context / trained context. Mamba-2 layers need nothing: the SSD scan has
no positional limit (its chunked reference pads to whole chunks).

`max_seq_len` stays the trained length on purpose: YaRN reads it as the original context
when it splits frequencies into interpolated and extrapolated bands.

Perplexity on long documents: each document is cut into non-overlapping windows of
`context` inputs (+1 target); every window is one full forward pass (the reference's: one
per trained length of it, so it scores the very same tokens), and the loss is reported
overall and per position bucket (by default one bucket per trained length), so the
tokens past the trained context are visible on their own. Logits are computed a chunk of
positions at a time (`token_losses`), never for a whole long window at once.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F

from mamba_slm.model.io import load_config

from .loading import LoadedModel, load_model_dir
from .quantize import check_device

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
def token_losses(model, ids: torch.Tensor, chunk_tokens: int = 2048) -> torch.Tensor:
    """ids (B, T + 1) -> next-token cross-entropy (B, T), float32, over the real vocabulary.

    The model runs once up to its final hidden states (`output_hidden`); the vocabulary
    projection and the loss then run over chunks of about `chunk_tokens` positions, so only
    one chunk's fp32 logits exist at a time (a 32K window of a 50K vocabulary would
    otherwise take 6.6 GB, twice over with the log-softmax)."""
    head, vocab = model.lm_head, model.config.vocab_size
    hidden = model(ids[:, :-1], output_hidden=True).hidden  # (B, T, hidden)
    step = max(1, chunk_tokens // ids.shape[0])
    losses = []
    for lo in range(0, hidden.shape[1], step):
        logits = head(hidden[:, lo: lo + step])[..., :vocab].float()  # (B, step, V)
        losses.append(F.cross_entropy(logits.transpose(1, 2), ids[:, lo + 1: lo + step + 1], reduction="none"))
    return torch.cat(losses, dim=1)


@torch.no_grad()
def long_document_perplexity(model, documents: Sequence[torch.Tensor], context: int,
                             bucket: int | None = None, batch_size: int = 1,
                             max_windows: int | None = None, segment: int | None = None) -> dict:
    """Next-token loss of `model` over the windows of `context` tokens of `documents`.

    `segment` (default: `context`) splits each window into pieces of at most that many
    inputs, each one forward pass from an empty state: the reference at the trained
    context so reads exactly the tokens of the longer windows. Returns {"context" (the
    length of one forward pass), "loss", "ppl", "tokens", "windows" (forward passes),
    "by_position": [{"start", "end", "loss", "ppl"}]}; `bucket` (default: the model's
    max_seq_len) is the width of a position bucket, positions counted within a pass."""
    bucket = bucket or model.config.max_seq_len
    windows = _windows(documents, context)
    if max_windows is not None:
        windows = windows[:max_windows]
    width = min(segment or context, context)
    device = next(model.parameters()).device
    sums = torch.zeros(width, dtype=torch.float64)  # loss summed per position of a pass
    counts = torch.zeros(width, dtype=torch.float64)
    for start in range(0, len(windows), batch_size):
        batch = windows[start: start + batch_size].to(device)
        for lo in range(0, context, width):
            loss = token_losses(model, batch[:, lo: lo + width + 1])  # (B, <= width)
            sums[: loss.shape[1]] += loss.sum(0).double().cpu()
            counts[: loss.shape[1]] += loss.shape[0]
    buckets = []
    for lo in range(0, width, bucket):
        hi = min(lo + bucket, width)
        mean = (sums[lo:hi].sum() / counts[lo:hi].sum()).item()
        buckets.append({"start": lo, "end": hi, "loss": mean, "ppl": math.exp(mean)})
    mean = (sums.sum() / counts.sum()).item()
    return {"context": width, "loss": mean, "ppl": math.exp(mean), "tokens": int(counts.sum()),
            "windows": len(windows) * math.ceil(context / width), "by_position": buckets}


def _on_device(loaded: LoadedModel, device: str):
    check_device(loaded.model, device, loaded.path, "evaluate it with --device cpu")
    return loaded.model.to(device)


def evaluate_long_context(path: str | Path, texts: Sequence[str], context: int,
                          scalings: Sequence[str] = ("none", "yarn"), max_windows: int | None = None,
                          device: str = "cpu") -> dict:
    """Perplexity of the documents' windows of `context` tokens (at most `max_windows`)
    with each RoPE scaling in `scalings`, beside the reference: the unscaled model reading
    the same tokens in pieces of at most the trained context. Every run scores the same
    targets. With `context` <= the trained context no scaling applies and the reference
    is the only run. "none" (the unscaled model over whole long windows) comes right after
    the reference, while the unscaled model is loaded; each scaled model is loaded, run
    and released in turn, so one model at a time sits on `device`."""
    trained = load_config(path).max_seq_len
    plain = load_model_dir(path)
    model = _on_device(plain, device)
    docs = tokenize_documents(plain.tokenizer, texts, plain.eos_id)
    runs = [{"rope_scaling": "none", **long_document_perplexity(model, docs, context, bucket=trained,
                                                                 max_windows=max_windows, segment=trained)}]
    kinds = [k for k in dict.fromkeys(scalings) if context > trained]  # else each would repeat the reference
    if "none" in kinds:
        runs.append({"rope_scaling": "none", **long_document_perplexity(model, docs, context, bucket=trained,
                                                                         max_windows=max_windows)})
    del model, plain
    for kind in kinds:
        if kind == "none":
            continue
        model = _on_device(load_long_context(path, context, kind), device)
        run = long_document_perplexity(model, docs, context, bucket=trained, max_windows=max_windows)
        runs.append({"rope_scaling": model.config.rope_scaling, **run})
        del model
    return {"trained_context": trained, "context": context, "runs": runs}
