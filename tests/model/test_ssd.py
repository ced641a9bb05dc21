"""The chunked SSD reference against the naive recurrence, in float64."""
import pytest
import torch

from mamba_slm.model.mamba2 import causal_conv_ref
from mamba_slm.model.ssd import ssd_chunked_ref, ssd_sequential_ref, ssd_step


def _inputs(b=2, T=37, h=4, p=8, g=2, n=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    kw = dict(dtype=torch.float64, generator=gen)
    return (torch.randn(b, T, h, p, **kw), torch.rand(b, T, h, **kw) * 0.5, -torch.rand(h, **kw) * 2,
            torch.randn(b, T, g, n, **kw), torch.randn(b, T, g, n, **kw), torch.randn(h, **kw))


@pytest.mark.parametrize("chunk", [1, 4, 16, 64])
@pytest.mark.parametrize("packed", [False, True])
def test_chunked_matches_sequential(chunk, packed):
    x, dt, A, B, C, D = _inputs()
    seq_idx = torch.tensor([[0] * 10 + [1] * 5 + [2] * 22, [0] * 3 + [1] * 30 + [2] * 4]) if packed else None
    y, final = ssd_chunked_ref(x, dt, A, B, C, chunk, D=D, seq_idx=seq_idx, return_final_states=True)
    y_ref, final_ref = ssd_sequential_ref(x, dt, A, B, C, D=D, seq_idx=seq_idx)
    torch.testing.assert_close(y, y_ref, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(final, final_ref, atol=1e-10, rtol=1e-10)


def test_initial_state_and_step_continue_the_scan():
    x, dt, A, B, C, D = _inputs(T=20)
    y_all, final_all = ssd_sequential_ref(x, dt, A, B, C, D=D)
    _, state = ssd_chunked_ref(x[:, :12], dt[:, :12], A, B[:, :12], C[:, :12], 8, D=D, return_final_states=True)
    y_mid, state = ssd_chunked_ref(x[:, 12:19], dt[:, 12:19], A, B[:, 12:19], C[:, 12:19], 4, D=D,
                                   initial_states=state, return_final_states=True)
    torch.testing.assert_close(y_mid, y_all[:, 12:19], atol=1e-10, rtol=1e-10)
    state = state.float()
    y_last = ssd_step(state, x[:, 19].float(), dt[:, 19].float(), A.float(), B[:, 19].float(),
                      C[:, 19].float(), D.float())
    torch.testing.assert_close(y_last.double(), y_all[:, 19], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(state.double(), final_all, atol=1e-4, rtol=1e-4)


def test_documents_are_isolated_in_the_scan():
    x, dt, A, B, C, D = _inputs(b=1, T=30)
    seq_idx = torch.tensor([[0] * 13 + [1] * 17])
    y, _ = ssd_sequential_ref(x, dt, A, B, C, D=D, seq_idx=seq_idx)
    y_doc2 = ssd_chunked_ref(x[:, 13:], dt[:, 13:], A, B[:, 13:], C[:, 13:], 8, D=D)
    torch.testing.assert_close(ssd_chunked_ref(x, dt, A, B, C, 8, D=D, seq_idx=seq_idx)[:, 13:], y_doc2)
    torch.testing.assert_close(y[:, 13:], y_doc2)


def test_conv_respects_documents():
    gen = torch.Generator().manual_seed(1)
    x, w, bias = torch.randn(2, 5, 12, generator=gen), torch.randn(5, 1, 4, generator=gen), torch.randn(5, generator=gen)
    seq_idx = torch.tensor([[0] * 6 + [1] * 6] * 2)
    out = causal_conv_ref(x, w, bias, seq_idx)
    torch.testing.assert_close(out[..., 6:], causal_conv_ref(x[..., 6:], w, bias))
    torch.testing.assert_close(out[..., :6], causal_conv_ref(x[..., :6], w, bias))
    torch.testing.assert_close(causal_conv_ref(x, w, bias), torch.nn.functional.conv1d(
        torch.nn.functional.pad(x, (3, 0)), w, bias, groups=5))
