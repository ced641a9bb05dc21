"""Small building blocks: RMSNorm (plain and gated), SwiGLU MLP, rotary embeddings."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

try:  # Triton RMSNorm from mamba-ssm: saves only the input and 1/rms for backward
    from mamba_ssm.ops.triton.layer_norm import rms_norm_fn
except Exception:  # noqa: BLE001 - optional GPU extension
    rms_norm_fn = None


class RMSNorm(nn.Module):
    """RMSNorm (Zhang & Sennrich 2019), computed in float32. On a GPU with mamba-ssm
    installed it runs mamba-ssm's Triton kernel unless `use_kernel` is False (the model
    sets it from `ModelConfig.ssm_path`, so "reference" means plain PyTorch everywhere)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.use_kernel = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_kernel and rms_norm_fn is not None and x.is_cuda:
            return rms_norm_fn(x, self.weight, None, eps=self.eps)
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight * xf).to(x.dtype)


class GatedRMSNorm(nn.Module):
    """Mamba-2's output norm: RMSNorm(y * silu(z)) per group of `group_size` channels
    ("norm after gate", mamba_ssm's RMSNormGated with norm_before_gate=False, which the
    fused kernel path computes; with one group it is transformers' BambaRMSNormGated)."""

    def __init__(self, dim: int, eps: float = 1e-5, group_size: int | None = None):
        super().__init__()
        self.eps, self.group_size = eps, group_size or dim
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        xf = x.float() * F.silu(gate.float())
        groups = xf.unflatten(-1, (-1, self.group_size))
        groups = groups * torch.rsqrt(groups.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight * groups.flatten(-2)).to(x.dtype)


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)) (Shazeer 2020); names match transformers' Bamba MLP."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)
        self.down_proj._is_residual_proj = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def rope_inv_freq(rotary_dim: int, theta: float, scaling: dict | None, max_seq_len: int) -> torch.Tensor:
    """Inverse frequencies, with optional context extension.

    scaling = {"type": "linear" | "ntk" | "yarn", "factor": s}:
    - linear: positions divided by s (Chen et al. 2023, position interpolation).
    - ntk: base theta * s^(d/(d-2)) ("NTK-aware" scaling, bloc97 2023).
    - yarn: per-frequency blend of interpolation and extrapolation between the
      beta_fast/beta_slow wavelengths (Peng et al. 2023, YaRN, without the attention
      temperature); the trained context is scaling["original_max_seq_len"], else max_seq_len.
    """
    exponents = torch.arange(0, rotary_dim, 2, dtype=torch.float32) / rotary_dim
    if not scaling:
        return 1.0 / theta ** exponents
    kind, factor = scaling.get("type"), float(scaling.get("factor", 1.0))
    if kind == "linear":
        return 1.0 / theta ** exponents / factor
    if kind == "ntk":
        return 1.0 / (theta * factor ** (rotary_dim / (rotary_dim - 2))) ** exponents
    if kind == "yarn":
        inv = 1.0 / theta ** exponents
        beta_fast, beta_slow = float(scaling.get("beta_fast", 32)), float(scaling.get("beta_slow", 1))
        # turns each frequency makes over the context the model was trained at
        original = float(scaling.get("original_max_seq_len", max_seq_len))
        rotations = original * inv / (2 * math.pi)
        ramp = ((rotations - beta_slow) / (beta_fast - beta_slow)).clamp(0, 1)  # 1: keep, 0: interpolate
        return inv / factor * (1 - ramp) + inv * ramp
    raise ValueError(f"rope_scaling type {kind!r}; expected 'linear', 'ntk' or 'yarn'")


class RotaryEmbedding(nn.Module):
    """RoPE on the first `rotary_dim` channels of each head, the rest pass through
    (transformers' Bamba applies rotary to half the head dimension)."""

    def __init__(self, rotary_dim: int, theta: float, scaling: dict | None = None, max_seq_len: int = 8192):
        super().__init__()
        self.rotary_dim = rotary_dim
        self.register_buffer("inv_freq", rope_inv_freq(rotary_dim, theta, scaling, max_seq_len),
                             persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (T,) -> cos, sin (T, rotary_dim), float32."""
        freqs = positions.float()[:, None] * self.inv_freq.to(positions.device)[None, :]
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos(), emb.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, D); rotate-half convention on the first cos.shape[-1] channels."""
    rd = cos.shape[-1]
    x_rot, x_pass = x[..., :rd], x[..., rd:]
    x1, x2 = x_rot.float().chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    x_rot = (x_rot.float() * cos + rotated * sin).to(x.dtype)
    return torch.cat([x_rot, x_pass], dim=-1)
