"""Mamba-2 mixer (Dao & Gu 2024, "Transformers are SSMs", sec. 7).

x -> in_proj -> [z | xBC | dt];  xBC -> causal depthwise conv -> silu -> [x | B | C];
y = SSD(x, softplus(dt + dt_bias), -exp(A_log), B, C) + D x;  out = out_proj(norm(y * silu(z))).

Parameter names and layout match transformers' `BambaMixer` one-to-one
(in_proj, conv1d, dt_bias, A_log, D, norm, out_proj), so export is a rename.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig
from .layers import GatedRMSNorm, fused_on_gpu
from .ssd import resolve_ssm_path, ssd_scan, ssd_step

log = logging.getLogger(__name__)

try:
    from causal_conv1d import causal_conv1d_fn, causal_conv1d_update
except Exception:  # noqa: BLE001 - optional GPU extension
    causal_conv1d_fn = causal_conv1d_update = None
try:  # single-token kernels for decoding (mamba_ssm Mamba2.step)
    from mamba_ssm.ops.triton.layernorm_gated import rmsnorm_fn as gated_rms_norm_fn
    from mamba_ssm.ops.triton.selective_state_update import selective_state_update
except Exception:  # noqa: BLE001
    gated_rms_norm_fn = selective_state_update = None
try:  # conv + SSD + gated norm + out_proj in one autograd function (mamba_ssm Mamba2's
    # "memory-efficient path"): saves only zxbcdt and recomputes the rest in backward
    from mamba_ssm.ops.triton.ssd_combined import mamba_split_conv1d_scan_combined
except Exception:  # noqa: BLE001
    mamba_split_conv1d_scan_combined = None


@dataclass
class MambaState:
    """Decoding state of one Mamba-2 layer, updated in place (fixed addresses, so a
    captured CUDA graph keeps working on it)."""
    conv: torch.Tensor  # (B, conv_dim, d_conv - 1): the last pre-conv inputs
    ssm: torch.Tensor   # (B, n_heads, head_dim, d_state), float32
    A: torch.Tensor     # (n_heads,) float32: -exp(A_log), derived once per prompt, not per token
    A_log: torch.Tensor  # the layer's parameter, to derive A again on reset

    def reset(self) -> None:
        self.conv.zero_()
        self.ssm.zero_()
        self.A.copy_(-torch.exp(self.A_log.detach().float()))


def causal_conv_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                    seq_idx: torch.Tensor | None = None, prev: torch.Tensor | None = None) -> torch.Tensor:
    """Depthwise causal conv. x (B, C, T), weight (C, 1, W), prev (B, C, W-1) or None.

    With `seq_idx`, tap k (input t-k) only counts where t-k is in t's document.
    """
    W = weight.shape[-1]
    if prev is None:
        prev = x.new_zeros(x.shape[0], x.shape[1], W - 1)
    xe = torch.cat([prev.to(x.dtype), x], dim=-1)
    if seq_idx is None:
        return F.conv1d(xe, weight, bias, groups=x.shape[1])
    T = x.shape[-1]
    seq_pad = F.pad(seq_idx, (W - 1, 0), value=-1)
    out = torch.zeros_like(x) if bias is None else bias[None, :, None].to(x.dtype).expand_as(x).clone()
    for k in range(W):
        tap = xe[..., W - 1 - k: W - 1 - k + T]
        same_doc = (seq_pad[:, W - 1 - k: W - 1 - k + T] == seq_idx)[:, None, :]
        out = out + weight[:, 0, W - 1 - k][None, :, None].to(x.dtype) * tap * same_doc
    return out


@fused_on_gpu
def conv_silu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
              seq_idx: torch.Tensor | None) -> torch.Tensor:
    """silu(causal_conv_ref(x, ...)): the kernel path's conv on a GPU without causal-conv1d,
    compiled into one fused kernel forward and one backward. Eager, the packed-document
    mask makes it ~20 elementwise kernels over (B, C, T) (4 masked taps, a concatenation,
    copies): 1.3B at 8K through the job ran 23,434 tokens/s that way on an H200 against
    37,741 with causal-conv1d (bench/RESULTS.md, session 9)."""
    return F.silu(causal_conv_ref(x, weight, bias, seq_idx))


class Mamba2Mixer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.d_inner = cfg.mamba_inner_size
        self.n_heads, self.head_dim = cfg.mamba_n_heads, cfg.mamba_head_dim
        self.n_groups, self.d_state = cfg.mamba_n_groups, cfg.mamba_d_state
        self.conv_dim = self.d_inner + 2 * self.n_groups * self.d_state
        self.in_proj = nn.Linear(cfg.hidden_size, self.d_inner + self.conv_dim + self.n_heads,
                                 bias=cfg.mamba_proj_bias)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, cfg.mamba_d_conv, groups=self.conv_dim,
                                padding=cfg.mamba_d_conv - 1, bias=cfg.mamba_conv_bias)
        self.dt_bias = nn.Parameter(torch.empty(self.n_heads))
        self.A_log = nn.Parameter(torch.empty(self.n_heads))
        self.D = nn.Parameter(torch.empty(self.n_heads))
        for p in (self.dt_bias, self.A_log, self.D):
            p._no_weight_decay = True
        self.norm = GatedRMSNorm(self.d_inner, eps=cfg.norm_eps, group_size=self.d_inner // self.n_groups)
        self.out_proj = nn.Linear(self.d_inner, cfg.hidden_size, bias=cfg.mamba_proj_bias)
        self.out_proj._is_residual_proj = True
        self._path: str | None = None
        self.reset_ssm_parameters()

    @torch.no_grad()
    def reset_ssm_parameters(self, dt_min: float = 1e-3, dt_max: float = 0.1, dt_floor: float = 1e-4) -> None:
        """Mamba-2 init (mamba_ssm `Mamba2.__init__`): dt log-uniform in [dt_min, dt_max]
        stored as softplus^-1 in dt_bias; A uniform in [1, 16] stored as log; D = 1."""
        dt = torch.exp(torch.rand(self.n_heads, device=self.dt_bias.device)
                       * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp(min=dt_floor)
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        self.A_log.copy_(torch.log(torch.empty(self.n_heads, device=self.A_log.device).uniform_(1, 16)))
        self.D.fill_(1.0)

    def path(self, device: torch.device) -> str:
        if self._path is None:
            self._path = resolve_ssm_path(self.cfg.ssm_path, device)
            log.info("Mamba-2 SSD path: %s (ssm_path=%s)", self._path, self.cfg.ssm_path)
        return self._path

    def new_state(self, batch: int, max_len: int, offset: torch.Tensor, device, dtype) -> MambaState:
        """The recurrent state has a fixed size: `max_len` and `offset` are not needed."""
        return MambaState(
            conv=torch.zeros(batch, self.conv_dim, self.cfg.mamba_d_conv - 1, device=device, dtype=dtype),
            ssm=torch.zeros(batch, self.n_heads, self.head_dim, self.d_state, device=device, dtype=torch.float32),
            A=-torch.exp(self.A_log.detach().float()).to(device), A_log=self.A_log)

    def forward(self, x: torch.Tensor, seq_idx: torch.Tensor | None = None,
                state: MambaState | None = None, valid_len: torch.Tensor | None = None,
                start: int = 0) -> torch.Tensor:
        """x (B, T, hidden) -> (B, T, hidden). With `state`, continue from it and update it.

        valid_len ((1,) int64 device tensor, with `state`): only the first valid_len tokens
        are real, the rest right padding (a prompt padded to a captured graph's length):
        their dt becomes 0 (softplus(-inf)), so they leave the SSM state as the real tokens
        left it, and the conv window keeps the last real inputs. (`start` is attention's.)"""
        b, T, _ = x.shape
        zxbcdt = self.in_proj(x)
        if state is None and self._fused(x.device):
            return self._fused_forward(zxbcdt, seq_idx)
        z, xBC, dt = zxbcdt.split([self.d_inner, self.conv_dim, self.n_heads], dim=-1)
        if state is not None and T == 1 and valid_len is None:
            return self._step(z, xBC, dt, state)
        if state is not None and valid_len is not None:
            pad = torch.arange(T, device=x.device)[None, :, None] >= valid_len
            dt = dt.masked_fill(pad, float("-inf"))
        xBC = self._conv(xBC, seq_idx, state, valid_len)  # (B, T, conv_dim), after silu
        xs, B, C = xBC.split([self.d_inner, self.n_groups * self.d_state, self.n_groups * self.d_state], dim=-1)
        dt = F.softplus(dt.float() + self.dt_bias.float())  # (B, T, n_heads)
        A = -torch.exp(self.A_log.float())
        out = ssd_scan(
            self.path(x.device), xs.reshape(b, T, self.n_heads, self.head_dim), dt, A,
            B.reshape(b, T, self.n_groups, self.d_state), C.reshape(b, T, self.n_groups, self.d_state),
            self.cfg.mamba_chunk_size, self.D, seq_idx=seq_idx,
            initial_states=None if state is None else state.ssm, return_final_states=state is not None)
        if state is not None:
            y, final = out
            state.ssm.copy_(final)
        else:
            y = out
        y = self.norm(y.reshape(b, T, self.d_inner), z)
        return self.out_proj(y)

    def _fused(self, device: torch.device) -> bool:
        return (self.path(device) == "kernel" and causal_conv1d_fn is not None
                and mamba_split_conv1d_scan_combined is not None)

    def _fused_forward(self, zxbcdt: torch.Tensor, seq_idx) -> torch.Tensor:
        if seq_idx is not None:
            seq_idx = seq_idx.to(torch.int32).contiguous()
        # The kernel applies out_proj itself when it is a plain linear; a swapped module
        # (float8, LoRA) runs as a module on the kernel's gated-norm output.
        plain = type(self.out_proj) is nn.Linear
        y = mamba_split_conv1d_scan_combined(
            zxbcdt, self.conv1d.weight.squeeze(1), self.conv1d.bias, self.dt_bias,
            -torch.exp(self.A_log.float()), D=self.D, chunk_size=self.cfg.mamba_chunk_size,
            seq_idx=seq_idx, activation="silu", rmsnorm_weight=self.norm.weight,
            rmsnorm_eps=self.norm.eps, outproj_weight=self.out_proj.weight if plain else None,
            outproj_bias=self.out_proj.bias if plain else None, headdim=self.head_dim,
            ngroups=self.n_groups, norm_before_gate=False)
        return y if plain else self.out_proj(y)

    def _conv(self, xBC: torch.Tensor, seq_idx, state: MambaState | None,
              valid_len: torch.Tensor | None = None) -> torch.Tensor:
        x = xBC.transpose(1, 2)  # (B, conv_dim, T)
        W = self.cfg.mamba_d_conv
        if state is None and self.path(x.device) == "kernel" and causal_conv1d_fn is not None:
            si = None if seq_idx is None else seq_idx.to(torch.int32).contiguous()
            return causal_conv1d_fn(x, self.conv1d.weight.squeeze(1), self.conv1d.bias,
                                    seq_idx=si, activation="silu").transpose(1, 2)
        if state is None and self.path(x.device) == "kernel":
            return conv_silu(x, self.conv1d.weight, self.conv1d.bias, seq_idx).transpose(1, 2)
        prev = None if state is None else state.conv
        out = causal_conv_ref(x, self.conv1d.weight, self.conv1d.bias, seq_idx, prev)
        if state is not None:
            full = torch.cat([state.conv.to(x.dtype), x], dim=-1)
            if valid_len is None:
                state.conv.copy_(full[..., -(W - 1):])
            else:  # the last W - 1 real inputs: columns [valid_len, valid_len + W - 1) of full
                state.conv.copy_(full.index_select(-1, valid_len + torch.arange(W - 1, device=x.device)))
        return F.silu(out).transpose(1, 2)

    def _step(self, z, xBC, dt, state: MambaState) -> torch.Tensor:
        """Single-token recurrence; z/xBC/dt are (B, 1, .). On the kernel path: causal-conv1d's
        conv update, mamba-ssm's selective_state_update and gated RMSNorm, one launch each."""
        b = z.shape[0]
        z, xBC, dt = z[:, 0], xBC[:, 0], dt[:, 0]  # (B, d_inner), (B, conv_dim), (B, n_heads)
        kernel = self.path(z.device) == "kernel"
        if kernel and causal_conv1d_update is not None:
            # The kernel wants input and state in one dtype (autocast hands bf16 to an fp32 cache).
            xBC = causal_conv1d_update(xBC.to(state.conv.dtype), state.conv, self.conv1d.weight.squeeze(1),
                                       self.conv1d.bias, "silu")
        else:
            xBC = F.silu(self._conv_step_ref(xBC, state))
        xs, B, C = xBC.split([self.d_inner, self.n_groups * self.d_state, self.n_groups * self.d_state], dim=-1)
        xs = xs.reshape(b, self.n_heads, self.head_dim)
        B, C = B.reshape(b, self.n_groups, self.d_state), C.reshape(b, self.n_groups, self.d_state)
        if kernel:
            # Per-head scalars broadcast over head_dim (and d_state) by stride-0 views: the
            # kernel's "tied head dim" fast path (mamba_ssm Mamba2.step).
            P, N = self.head_dim, self.d_state
            y = selective_state_update(
                state.ssm, xs, dt[..., None].expand(-1, -1, P), state.A[:, None, None].expand(-1, P, N),
                B, C, D=self.D[:, None].expand(-1, P), dt_bias=self.dt_bias[:, None].expand(-1, P),
                dt_softplus=True)
            y = gated_rms_norm_fn(y.reshape(b, self.d_inner), self.norm.weight, None, z=z, eps=self.norm.eps,
                                  group_size=self.norm.group_size, norm_before_gate=False)
        else:
            dt = F.softplus(dt.float() + self.dt_bias.float())
            y = ssd_step(state.ssm, xs, dt, state.A, B, C, self.D)
            y = self.norm(y.reshape(b, self.d_inner), z)
        return self.out_proj(y[:, None])

    def _conv_step_ref(self, x: torch.Tensor, state: MambaState) -> torch.Tensor:
        """x (B, conv_dim) -> conv output (B, conv_dim) before silu; the window slides in place."""
        w = self.conv1d.weight[:, 0, :].to(x.dtype)  # (conv_dim, d_conv)
        out = (state.conv.to(x.dtype) * w[:, :-1]).sum(-1) + x * w[:, -1]
        if self.conv1d.bias is not None:
            out = out + self.conv1d.bias.to(x.dtype)
        state.conv.copy_(state.conv.roll(-1, dims=-1))
        state.conv[:, :, -1] = x
        return out
