"""State space duality (SSD), the scan at the heart of Mamba-2.

Two paths, chosen once by `ModelConfig.ssm_path`:
- kernel: mamba-ssm's Triton kernels (`mamba_chunk_scan_combined`), GPU only.
- reference: `ssd_chunked_ref`, the chunked SSD algorithm in plain PyTorch (Dao & Gu 2024,
  "Transformers are SSMs", Listing 1 / `ssd_minimal_discrete`), extended with document
  resets: tokens of different documents in one packed row never exchange state.

`ssd_sequential_ref` is the naive token-by-token recurrence, the oracle for tests.

Shapes: x (B, T, H, P), dt (B, T, H) (after softplus), A (H,) negative, B/C (B, T, G, N)
with G groups shared by H/G heads, D (H,), seq_idx (B, T) int, non-decreasing along T.
The recurrence per head: h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T;  y_t = h_t C_t + D x_t.
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

try:  # GPU kernels; absent on a CPU install
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
except Exception:  # noqa: BLE001 - mamba_ssm raises ImportError or CUDA errors on import
    mamba_chunk_scan_combined = None


def kernels_available() -> bool:
    return mamba_chunk_scan_combined is not None and torch.cuda.is_available()


def resolve_ssm_path(requested: str, device: torch.device) -> str:
    """Map "auto" to a concrete path; a kernel asked for and missing is an error."""
    if requested == "reference":
        return "reference"
    has_kernel = mamba_chunk_scan_combined is not None and device.type == "cuda"
    if requested == "kernel":
        if not has_kernel:
            raise RuntimeError(
                "ssm_path='kernel' needs mamba-ssm and a CUDA device "
                "(pip install --no-build-isolation 'mamba-slm[gpu]'); use ssm_path='reference' on CPU")
        return "kernel"
    return "kernel" if has_kernel else "reference"


def _segsum(x: torch.Tensor) -> torch.Tensor:
    """Stable segment sum: out[..., i, j] = sum(x[..., j+1:i+1]) for j <= i, else -inf."""
    T = x.size(-1)
    x = x[..., None].expand(*x.shape, T)  # (..., T, T): column j holds x
    lower = torch.tril(torch.ones(T, T, dtype=torch.bool, device=x.device), diagonal=-1)
    x = x.masked_fill(~lower, 0)
    out = torch.cumsum(x, dim=-2)
    keep = torch.tril(torch.ones(T, T, dtype=torch.bool, device=x.device), diagonal=0)
    return out.masked_fill(~keep, float("-inf"))


def ssd_chunked_ref(x, dt, A, B, C, chunk_size, D=None, seq_idx=None,
                    initial_states=None, return_final_states=False):
    """Chunked SSD in PyTorch, computed in float32 (float64 if given float64).

    Returns y (B, T, H, P) in x's dtype, and the final state (B, H, P, N) if asked.
    With `seq_idx`, every decay that would cross a document boundary is zeroed.
    """
    out_dtype = x.dtype
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    b, T, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    x, dt, A, B, C = (t.to(work) for t in (x, dt, A, B, C))
    B = B.repeat_interleave(h // g, dim=2)  # (b, T, h, n)
    C = C.repeat_interleave(h // g, dim=2)
    pad = (-T) % chunk_size
    if seq_idx is None:
        seq_idx = torch.zeros(b, T, dtype=torch.int32, device=x.device)
    if pad:  # zero input and zero decay (A*dt = 0) leave the state untouched
        x, B, C = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (x, B, C))
        dt = F.pad(dt, (0, 0, 0, pad))
        seq_idx = F.pad(seq_idx, (0, pad), value=0)
        seq_idx[:, T:] = seq_idx[:, T - 1:T]
    L, c = chunk_size, (T + pad) // chunk_size
    X = (x * dt[..., None]).view(b, c, L, h, p)
    Adt = (dt * A).view(b, c, L, h).permute(0, 3, 1, 2)  # (b, h, c, L)
    B, C = B.view(b, c, L, h, n), C.view(b, c, L, h, n)
    doc = seq_idx.view(b, c, L)
    A_cum = torch.cumsum(Adt, dim=-1)

    # 1. Within each chunk: a masked, decayed attention-like product.
    same = (doc[:, :, :, None] == doc[:, :, None, :])[:, None]  # (b, 1, c, L, L)
    decay = torch.exp(_segsum(Adt)) * same
    y_diag = torch.einsum("bclhn,bcshn,bhcls,bcshp->bclhp", C, B, decay, X)

    # 2. The state each chunk leaves behind, from tokens of the chunk's last document.
    last = doc[:, :, -1:]  # (b, c, 1)
    to_end = torch.exp(A_cum[..., -1:] - A_cum) * (doc == last)[:, None]  # (b, h, c, L)
    states = torch.einsum("bclhn,bhcl,bclhp->bchpn", B, to_end, X)

    # 3. Pass states across chunks; a state crosses only within one document.
    if initial_states is None:
        initial_states = torch.zeros_like(states[:, :1])
    else:
        initial_states = initial_states.to(work)[:, None]
    states = torch.cat([initial_states, states], dim=1)  # (b, c+1, h, p, n)
    chunk_doc = torch.cat([doc[:, :1, 0], last[..., 0]], dim=1)  # (b, c+1)
    chunk_decay = torch.exp(_segsum(F.pad(A_cum[..., -1], (1, 0))))  # (b, h, c+1, c+1)
    chunk_decay = chunk_decay * (chunk_doc[:, :, None] == chunk_doc[:, None, :])[:, None]
    new_states = torch.einsum("bhzc,bchpn->bzhpn", chunk_decay, states)
    states, final_state = new_states[:, :-1], new_states[:, -1]

    # 4. Each token reads the state entering its chunk, if it is still its document.
    entering_doc = chunk_doc[:, :-1, None]  # (b, c, 1)
    from_start = torch.exp(A_cum) * (doc == entering_doc)[:, None]  # (b, h, c, L)
    y_off = torch.einsum("bclhn,bchpn,bhcl->bclhp", C, states, from_start)

    y = (y_diag + y_off).reshape(b, c * L, h, p)[:, :T]
    if D is not None:
        y = y + x[:, :T] * D.to(work)[:, None]
    y = y.to(out_dtype)
    return (y, final_state) if return_final_states else y


def ssd_sequential_ref(x, dt, A, B, C, D=None, seq_idx=None, initial_states=None):
    """Token-by-token recurrence (slow, exact): the oracle for `ssd_chunked_ref`."""
    b, T, h, p = x.shape
    g = B.shape[2]
    B = B.repeat_interleave(h // g, dim=2)
    C = C.repeat_interleave(h // g, dim=2)
    state = (torch.zeros(b, h, p, B.shape[-1], dtype=x.dtype, device=x.device)
             if initial_states is None else initial_states.clone())
    ys = []
    for t in range(T):
        if seq_idx is not None and t > 0:
            new_doc = (seq_idx[:, t] != seq_idx[:, t - 1]).to(x.dtype)[:, None, None, None]
            state = state * (1 - new_doc)
        decay = torch.exp(dt[:, t] * A)[:, :, None, None]  # (b, h, 1, 1)
        state = decay * state + torch.einsum("bhp,bhn->bhpn", x[:, t] * dt[:, t, :, None], B[:, t])
        y = torch.einsum("bhpn,bhn->bhp", state, C[:, t])
        if D is not None:
            y = y + D[:, None] * x[:, t]
        ys.append(y)
    return torch.stack(ys, dim=1), state


def ssd_step(state, x, dt, A, B, C, D):
    """One decoding step. state (b, h, p, n) updated in place; x (b, h, p), dt (b, h),
    B/C (b, g, n). Returns y (b, h, p)."""
    h, g = x.shape[1], B.shape[1]
    B = B.repeat_interleave(h // g, dim=1).float()
    C = C.repeat_interleave(h // g, dim=1).float()
    dt, xf = dt.float(), x.float()
    decay = torch.exp(dt * A.float())[:, :, None, None]
    state.copy_(decay * state + torch.einsum("bhp,bhn->bhpn", xf * dt[..., None], B))
    y = torch.einsum("bhpn,bhn->bhp", state, C) + D.float()[:, None] * xf
    return y.to(x.dtype)


def ssd_scan(path, x, dt, A, B, C, chunk_size, D, seq_idx=None, initial_states=None,
             return_final_states=False):
    """Dispatch to the kernel or the reference. `dt` is already softplus(dt + dt_bias)."""
    if path == "kernel":
        if seq_idx is not None:
            seq_idx = seq_idx.to(torch.int32).contiguous()
        return mamba_chunk_scan_combined(
            x, dt, A, B, C, chunk_size, D=D, seq_idx=seq_idx,
            initial_states=initial_states, return_final_states=return_final_states)
    return ssd_chunked_ref(x, dt, A, B, C, chunk_size, D=D, seq_idx=seq_idx,
                           initial_states=initial_states, return_final_states=return_final_states)
