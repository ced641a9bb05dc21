"""Cross-entropy over the vocabulary projection without keeping (tokens, vocab) logits.

`linear_cross_entropy(h, weight, labels)` = sum of CE(h @ weight.T, labels) over tokens
whose label is not -100. It walks the tokens in chunks and computes each chunk's
gradients in the forward pass (the approach of Liger-Kernel's fused linear
cross-entropy): the softmax minus the one-hot target, times the weight for dh, and its
transpose times h for dW. The backward then only scales them by the incoming gradient,
so the projection runs 3 matmuls per chunk instead of the 4 of a chunked loss that is
recomputed in backward, and peak memory holds one chunk's fp32 logits plus dW in fp32.

`LMHead` is the model's vocabulary projection: given labels, its forward returns this loss
instead of logits. Computing it inside the module's forward is what lets ZeRO-3 use it:
DeepSpeed gathers a partitioned weight only around its module's forward (and backward).
"""
from __future__ import annotations

import torch
from torch import nn


class LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk: int) -> torch.Tensor:
        # Under autocast the matmuls run in the autocast dtype, as lm_head(h) would.
        dtype = torch.get_autocast_dtype(h.device.type) if torch.is_autocast_enabled(h.device.type) else h.dtype
        with torch.autocast(h.device.type, enabled=False):
            w = weight.to(dtype)
            total = torch.zeros((), dtype=torch.float32, device=h.device)
            need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]  # none under no_grad
            grad_h = torch.empty_like(h) if need_h else None
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
            for start in range(0, h.shape[0], chunk):
                h_c, y_c = h[start:start + chunk].to(dtype), labels[start:start + chunk]
                logits = (h_c @ w.T).float()
                lse = logits.logsumexp(-1)
                valid = y_c != -100
                target = y_c.clamp(min=0)
                total += ((lse - logits.gather(1, target[:, None]).squeeze(1)) * valid).sum()
                if not (need_h or need_w):
                    continue
                grad = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
                grad[torch.arange(len(y_c), device=h.device), target] -= 1
                grad = (grad * valid[:, None]).to(dtype)
                if need_h:
                    grad_h[start:start + chunk] = grad @ w
                if need_w:
                    grad_w += (grad.T @ h_c).float()
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor):
        grad_h, grad_w = ctx.saved_tensors
        return (None if grad_h is None else grad_h * grad_total.to(grad_h.dtype),
                None if grad_w is None else (grad_w * grad_total).to(ctx.weight_dtype), None, None)


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         chunk_tokens: int = 4096) -> torch.Tensor:
    """h (N, hidden), weight (V, hidden), labels (N,) with -100 ignored -> summed CE (fp32)."""
    return LinearCrossEntropy.apply(h, weight, labels, chunk_tokens)


class LMHead(nn.Linear):
    """nn.Linear(hidden, vocab, bias=False) whose forward(h, labels) returns the summed
    cross-entropy of `linear_cross_entropy` (h (N, hidden), labels (N,)), and logits
    without labels. Same parameter, same state-dict name as the plain linear."""

    def __init__(self, hidden: int, vocab: int, **kw):
        super().__init__(hidden, vocab, bias=False, **kw)

    def forward(self, h: torch.Tensor, labels: torch.Tensor | None = None,
                chunk_tokens: int = 4096) -> torch.Tensor:
        if labels is None:
            return super().forward(h)
        return linear_cross_entropy(h, self.weight, labels, chunk_tokens)
