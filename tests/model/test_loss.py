"""linear_cross_entropy against F.cross_entropy on full logits: loss and both gradients."""
import pytest
import torch
import torch.nn.functional as F

from mamba_slm.model.loss import linear_cross_entropy


@pytest.mark.parametrize("chunk", [5, 16, 1000])
def test_matches_full_cross_entropy(chunk):
    torch.manual_seed(0)
    h = torch.randn(37, 24, dtype=torch.float64, requires_grad=True)
    w = torch.randn(50, 24, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 50, (37,))
    labels[[3, 9, 30]] = -100
    want = F.cross_entropy(h @ w.T, labels, ignore_index=-100, reduction="sum")
    (want * 0.7).backward()
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    got = linear_cross_entropy(h, w, labels, chunk)
    (got * 0.7).backward()
    torch.testing.assert_close(got, want.float(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(h.grad, gh, rtol=1e-5, atol=1e-5)  # fp32 logits
    torch.testing.assert_close(w.grad, gw, rtol=1e-5, atol=1e-5)  # fp32 logits, accumulated in fp32


def test_no_grad_and_frozen_weight():
    h, w = torch.randn(8, 4, requires_grad=True), torch.randn(6, 4)
    labels = torch.randint(0, 6, (8,))
    with torch.no_grad():
        plain = linear_cross_entropy(h, w, labels)
    loss = linear_cross_entropy(h, w, labels)
    loss.backward()
    torch.testing.assert_close(plain, loss.detach())
    assert w.grad is None and h.grad is not None


def test_bf16_autocast_matches_lm_head_path():
    torch.manual_seed(0)
    h, w = torch.randn(64, 32), torch.randn(40, 32) * 0.2
    labels = torch.randint(0, 40, (64,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = F.cross_entropy((h @ w.T).float(), labels, reduction="sum")
        got = linear_cross_entropy(h, w, labels, 16)
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)
