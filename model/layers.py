"""Small building blocks: RMSNorm (plain and gated), SwiGLU MLP, rotary embeddings."""
from __future__ import annotations

import functools
import logging
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

# Elementwise chains (SwiGLU's activation, RoPE) run through torch.compile on a GPU: one
# fused Triton kernel forward and one backward instead of 4-10 kernels that each read and
# write the full activation. MAMBA_SLM_COMPILE=0 turns it off (the benchmarks toggle it).
COMPILE_ON_GPU = os.environ.get("MAMBA_SLM_COMPILE", "1") != "0"
log = logging.getLogger(__name__)


def fused_on_gpu(fn=None, *, recompiles: int = 0, **compile_options):
    """`fn` compiled by torch.compile when its first argument is a CUDA tensor (compiled
    on first use, recompiled per dtype and, after the first change, shape-generic); the
    plain function on a CPU, when COMPILE_ON_GPU is off, or inside an outer compile. If
    compiling fails (say, no C compiler for Triton's launcher), it warns once and stays
    with the plain function. With arguments (`@fused_on_gpu(dynamic=False, ...)`), they go
    to torch.compile (after fullgraph=True), and `recompiles` lets dynamo keep that many
    graphs of a function (one per weight shape, say) before it falls back to eager."""
    if fn is None:
        return functools.partial(fused_on_gpu, recompiles=recompiles, **compile_options)
    compiled = None

    @functools.wraps(fn)
    def wrapper(*args):
        nonlocal compiled
        if not (COMPILE_ON_GPU and args[0].is_cuda) or torch.compiler.is_compiling():
            return fn(*args)
        if compiled is None:
            allow_recompiles(recompiles)
            compiled = torch.compile(fn, **{"fullgraph": True, **compile_options})
        try:
            return compiled(*args)
        except Exception as exc:  # noqa: BLE001 - a speed-up only; the plain function is exact
            if compiled is fn:
                raise
            log.warning("torch.compile of %s failed (%r); running it uncompiled "
                        "(MAMBA_SLM_COMPILE=0 skips the attempt)", fn.__name__, exc)
            compiled = fn
            return fn(*args)
    return wrapper


def allow_recompiles(n: int) -> None:
    """Raise dynamo's per-function recompile limit (8 by default; past it a new shape runs
    uncompiled) to at least `n`."""
    if n > 0:
        import torch._dynamo

        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, n)


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

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """norm(x); with `residual`, the pre-norm residual step fused into one pass:
        returns (norm(x + residual), x + residual), the sum kept in residual's dtype
        (mamba-ssm's fused add+norm: one read of each input instead of an add kernel)."""
        if self.use_kernel and rms_norm_fn is not None and x.is_cuda:
            if residual is None:
                return rms_norm_fn(x, self.weight, None, eps=self.eps)
            return rms_norm_fn(x, self.weight, None, residual=residual, prenorm=True, eps=self.eps)
        if residual is not None:
            summed = (residual + x).to(residual.dtype)
            return self.forward(summed), summed
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


class PackedLinears:
    """Bias-free linears that read one input, made rows of one weight tensor so that one
    matmul computes them all (one GEMV instead of two or three per decode step).

    The parameters stay separate (state dict, optimizers and converters see the same
    names) but become views of the packed tensor, so the packing costs no memory. It is
    used for inference only (`packed()` is None while autograd records: gradients would
    not reach the views), and it lapses by itself when a parameter stops being a view of
    it (`model.to(dtype)`, a LoRA or quantized module swapped in, DeepSpeed's flat buffers).
    Besides `nn.Linear`, a module type with a `stack_rows(modules)` classmethod (INT8
    weight-only, platform/post/quantize.py) packs into one module of its own type.
    """

    def __init__(self, owner: nn.Module, names: tuple[str, ...]):
        self.owner, self.names = owner, names  # owner holds this object, so no cycle issue
        self.weight: torch.Tensor | None = None
        self.module: nn.Module | None = None  # the packed module, for stack_rows types

    def _linears(self) -> list[nn.Module]:
        return [getattr(self.owner, n) for n in self.names]

    def pack(self) -> None:
        linears = self._linears()
        kind = type(linears[0])
        if (self._valid() or any(type(m) is not kind or m.bias is not None for m in linears)
                or not (kind is nn.Linear or hasattr(kind, "stack_rows"))):
            return
        if kind is not nn.Linear:
            self.module = kind.stack_rows(linears)  # the members' buffers become views of its own
            self.weight = self.module.weight
            return
        packed = torch.cat([m.weight.detach() for m in linears])
        start = 0
        for m in linears:
            rows = m.weight.shape[0]
            m.weight.data = packed[start:start + rows]
            start += rows
        self.weight, self.module = packed, None

    def _valid(self) -> bool:
        """Every weight (and, for a packed module, every buffer) still a view of the packed
        one (pack() made them so)."""
        if self.weight is None:
            return False
        if self.module is None:
            packed = {"weight": self.weight}
        else:
            packed = {name: t for name, t in self.module.named_buffers(recurse=False) if t is not None}
        kind = nn.Linear if self.module is None else type(self.module)
        if any(type(m) is not kind or any(getattr(m, name) is None or getattr(m, name).untyped_storage().data_ptr()
                                          != t.untyped_storage().data_ptr() for name, t in packed.items())
               for m in self._linears()):
            self.weight = self.module = None  # lapsed: let the old storage go
            return False
        return True

    def packed(self) -> torch.Tensor | None:
        """The packed weight, or None (not packed, lapsed, or autograd recording)."""
        return None if torch.is_grad_enabled() or not self._valid() else self.weight

    def __call__(self, x: torch.Tensor) -> torch.Tensor | None:
        """The members' outputs side by side, from one matmul; None where not packed."""
        weight = self.packed()
        if weight is None:
            return None
        return F.linear(x, weight) if self.module is None else self.module(x)


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)) (Shazeer 2020); names match transformers' Bamba MLP."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)
        self.down_proj._is_residual_proj = True
        self.gate_up = PackedLinears(self, ("gate_proj", "up_proj"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        both = self.gate_up(x)
        if both is not None:
            gate, up = both.chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(silu_mul(gate, up))


@fused_on_gpu
def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


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


@fused_on_gpu
def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, D); rotate-half convention on the first cos.shape[-1] channels."""
    rd = cos.shape[-1]
    x_rot, x_pass = x[..., :rd], x[..., rd:]
    x1, x2 = x_rot.float().chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    x_rot = (x_rot.float() * cos + rotated * sin).to(x.dtype)
    return torch.cat([x_rot, x_pass], dim=-1)
