"""Typed model configuration, named presets and the hybrid layer layout.

A model is a stack of `n_layers` blocks; `layer_pattern` says per layer which mixer it
uses: "A" (grouped-query attention) or "M" (Mamba-2 / SSD). Every block also has a SwiGLU
MLP. The pattern is given verbatim or derived from an attention ratio and a placement
rule; these are the knobs a layout sweep turns (`mamba_slm.tune`).

Field names follow transformers' `BambaConfig` where one exists, so that the export to
`BambaForCausalLM` is a rename, not a reinterpretation.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

ATTENTION, MAMBA = "A", "M"
PLACEMENTS = ("strategic", "uniform", "front", "back")
SSM_PATHS = ("auto", "kernel", "reference")
ATTN_IMPLS = ("auto", "sdpa", "flash", "flex")


def _evenly_spaced(count: int, start: int, stop: int) -> list[int]:
    """`count` indices spread evenly over [start, stop), centred in equal segments."""
    span = stop - start
    return [start + int((i + 0.5) * span / count) for i in range(count)]


ROPE_SCALING_KEYS = {"linear": {"factor"}, "ntk": {"factor"},
                     "yarn": {"factor", "beta_fast", "beta_slow", "original_max_seq_len"}}


def check_rope_scaling(scaling: Any, rotary_dim: int) -> None:
    """`ModelConfig.rope_scaling` as model/layers.py's `rope_inv_freq` reads it: {"type":
    "linear" | "ntk" | "yarn", "factor": >= 1, yarn's beta_fast > beta_slow >= 0 and
    original_max_seq_len}. A missing factor or a key under another name (transformers'
    "rope_type", "original_max_position_embeddings") would silently change nothing."""
    where = f"ModelConfig.rope_scaling={scaling!r}"
    if not isinstance(scaling, dict):
        raise ValueError(f"{where}: expected a dict such as {{'type': 'yarn', 'factor': 4.0}}, or None")
    kind = scaling.get("type")
    if kind not in ROPE_SCALING_KEYS:
        hint = " (this project's key is 'type', not transformers' 'rope_type')" if "rope_type" in scaling else ""
        raise ValueError(f"{where}: 'type' must be one of {sorted(ROPE_SCALING_KEYS)}{hint}")
    unknown = sorted(set(scaling) - ROPE_SCALING_KEYS[kind] - {"type"})
    if unknown:
        hint = (" ('original_max_position_embeddings' is 'original_max_seq_len' here)"
                if "original_max_position_embeddings" in unknown else "")
        raise ValueError(f"{where}: unknown key(s) {unknown} for type {kind!r}; it takes "
                         f"{sorted(ROPE_SCALING_KEYS[kind])}{hint}")
    factor = scaling.get("factor")
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not 1 <= factor < math.inf:
        raise ValueError(f"{where}: 'factor' must be a finite number >= 1 (the context's stretch)")
    if kind == "ntk" and rotary_dim <= 2:
        raise ValueError(f"{where}: NTK scaling needs a rotary dimension above 2 (it is {rotary_dim})")
    if kind == "yarn":
        fast, slow = scaling.get("beta_fast", 32), scaling.get("beta_slow", 1)
        if not (isinstance(fast, (int, float)) and isinstance(slow, (int, float)) and 0 <= slow < fast < math.inf):
            raise ValueError(f"{where}: YaRN needs beta_fast > beta_slow >= 0 (defaults 32 and 1)")
        original = scaling.get("original_max_seq_len", 1)
        if isinstance(original, bool) or not isinstance(original, int) or original <= 0:
            raise ValueError(f"{where}: 'original_max_seq_len' must be a positive integer (the trained context)")


def derive_layer_pattern(n_layers: int, attn_ratio: float, placement: str) -> str:
    """Build a per-layer pattern from an attention ratio and a placement rule.

    - strategic (the seed's rule): attention in the first layer (two when there are 8+
      attention layers), the last two (three when 10+), the rest evenly spaced in the
      middle. One attention layer goes in the middle; two go first and last.
    - uniform: evenly spaced over the whole stack (the Mamba-2 paper's finding is that
      ~10% attention spread out works best; Dao & Gu 2024, sec. 9.2.3).
    - front / back: evenly spaced over the first / second half of the stack.
    """
    n_attn = round(attn_ratio * n_layers)
    if attn_ratio > 0:
        n_attn = max(1, n_attn)
    if n_attn > n_layers:
        raise ValueError(f"attn_ratio={attn_ratio} gives more attention layers than n_layers={n_layers}")
    if n_attn == 0:
        return MAMBA * n_layers
    if placement == "uniform":
        idx = _evenly_spaced(n_attn, 0, n_layers)
    elif placement == "front":
        idx = _evenly_spaced(n_attn, 0, max(n_attn, n_layers // 2))
    elif placement == "back":
        half = min(n_layers // 2, n_layers - n_attn)
        idx = _evenly_spaced(n_attn, half, n_layers)
    elif placement == "strategic":
        if n_attn == 1:
            idx = [n_layers // 2]
        elif n_attn == 2:
            idx = [0, n_layers - 1]
        else:
            n_first = 2 if n_attn >= 8 else 1
            n_last = 3 if n_attn >= 10 else 2
            n_mid = n_attn - n_first - n_last
            # Equal gaps between the last front layer and the first back layer.
            lo, hi = n_first - 1, n_layers - n_last
            mid = [lo + round((i + 1) * (hi - lo) / (n_mid + 1)) for i in range(n_mid)]
            idx = list(range(n_first)) + mid + list(range(n_layers - n_last, n_layers))
    else:
        raise ValueError(f"attn_placement={placement!r}; expected one of {PLACEMENTS}")
    pattern = [MAMBA] * n_layers
    for i in idx:
        pattern[i] = ATTENTION
    if pattern.count(ATTENTION) != n_attn:  # collisions only happen for degenerate sizes
        raise ValueError(
            f"cannot place {n_attn} attention layers in {n_layers} layers with "
            f"attn_placement={placement!r}; give layer_pattern verbatim instead")
    return "".join(pattern)


@dataclass
class ModelConfig:
    """Architecture of a `HybridLM`. All fields are plain JSON values (`to_dict`)."""

    name: str = "custom"
    vocab_size: int = 50304
    pad_vocab_multiple: int = 64
    hidden_size: int = 2048
    n_layers: int = 24
    # Layout: verbatim pattern, or derived from ratio + placement when left empty.
    layer_pattern: str = ""
    attn_ratio: float = 0.25
    attn_placement: str = "strategic"
    # Attention (GQA + RoPE on a fraction of each head, as transformers' Bamba).
    n_heads: int = 16
    n_kv_heads: int = 4
    rotary_fraction: float = 0.5
    rope_theta: float = 10_000.0
    rope_scaling: dict[str, Any] | None = None
    max_seq_len: int = 8192
    # Mamba-2 (SSD) mixer.
    mamba_expand: int = 2
    mamba_d_state: int = 128
    mamba_d_conv: int = 4
    mamba_head_dim: int = 64
    mamba_n_groups: int = 1
    mamba_chunk_size: int = 256
    mamba_conv_bias: bool = True
    mamba_proj_bias: bool = False
    # MLP and the rest.
    mlp_hidden_size: int = 5632
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    init_std: float = 0.02
    # Which implementation runs: "auto" picks the GPU kernels when installed.
    ssm_path: str = "auto"
    attn_impl: str = "auto"
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        positive = ("vocab_size", "hidden_size", "n_layers", "n_heads", "n_kv_heads",
                    "max_seq_len", "mamba_expand", "mamba_d_state", "mamba_d_conv",
                    "mamba_head_dim", "mamba_n_groups", "mamba_chunk_size",
                    "mlp_hidden_size", "pad_vocab_multiple")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"ModelConfig.{name}={value!r}: must be a positive integer")
        for name in ("norm_eps", "init_std", "rope_theta"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
                raise ValueError(f"ModelConfig.{name}={value!r}: must be a positive finite number")
        for name in ("tie_embeddings", "mamba_conv_bias", "mamba_proj_bias"):
            if not isinstance(getattr(self, name), bool):  # "false" from a YAML/CLI string would be truthy
                raise ValueError(f"ModelConfig.{name}={getattr(self, name)!r}: must be true or false")
        if self.mamba_d_conv < 2:
            raise ValueError(f"ModelConfig.mamba_d_conv={self.mamba_d_conv}: the causal conv needs a window of "
                             "at least 2 (causal-conv1d takes 2-4)")
        if self.attn_placement not in PLACEMENTS:
            raise ValueError(f"ModelConfig.attn_placement={self.attn_placement!r}: expected one of {PLACEMENTS}")
        if not 0.0 <= self.attn_ratio <= 1.0:
            raise ValueError(f"ModelConfig.attn_ratio={self.attn_ratio}: must be in [0, 1]")
        if self.ssm_path not in SSM_PATHS:
            raise ValueError(f"ModelConfig.ssm_path={self.ssm_path!r}: expected one of {SSM_PATHS}")
        if self.attn_impl not in ATTN_IMPLS:
            raise ValueError(f"ModelConfig.attn_impl={self.attn_impl!r}: expected one of {ATTN_IMPLS}")
        if not self.layer_pattern:
            self.layer_pattern = derive_layer_pattern(self.n_layers, self.attn_ratio, self.attn_placement)
        self.layer_pattern = self.layer_pattern.upper()
        bad = sorted(set(self.layer_pattern) - {ATTENTION, MAMBA})
        if bad:
            raise ValueError(
                f"ModelConfig.layer_pattern={self.layer_pattern!r} has {bad}: use only "
                f"'{ATTENTION}' (attention) and '{MAMBA}' (Mamba-2), one letter per layer")
        if len(self.layer_pattern) != self.n_layers:
            raise ValueError(
                f"ModelConfig.layer_pattern has {len(self.layer_pattern)} letters but "
                f"n_layers={self.n_layers}: give one letter per layer")
        if ATTENTION in self.layer_pattern:
            if self.hidden_size % self.n_heads:
                raise ValueError(f"ModelConfig.hidden_size={self.hidden_size} is not divisible by n_heads={self.n_heads}")
            if self.n_heads % self.n_kv_heads:
                raise ValueError(f"ModelConfig.n_heads={self.n_heads} is not divisible by n_kv_heads={self.n_kv_heads}")
            rot = self.head_dim * self.rotary_fraction
            if not (0 < self.rotary_fraction <= 1) or rot != int(rot) or int(rot) % 2:
                raise ValueError(
                    f"ModelConfig.rotary_fraction={self.rotary_fraction}: head_dim * fraction must be "
                    f"an even integer (head_dim={self.head_dim})")
        if self.rope_scaling is not None:
            check_rope_scaling(self.rope_scaling, self.rotary_dim)
        if MAMBA in self.layer_pattern:
            if self.mamba_inner_size % self.mamba_head_dim:
                raise ValueError(
                    f"ModelConfig.mamba_head_dim={self.mamba_head_dim} must divide "
                    f"mamba_expand * hidden_size = {self.mamba_inner_size}")
            if self.mamba_n_heads % self.mamba_n_groups:
                raise ValueError(
                    f"ModelConfig.mamba_n_groups={self.mamba_n_groups} must divide the "
                    f"number of Mamba heads ({self.mamba_n_heads})")

    # Derived sizes -------------------------------------------------------------------
    @property
    def padded_vocab_size(self) -> int:
        m = self.pad_vocab_multiple
        return math.ceil(self.vocab_size / m) * m

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.n_heads

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.rotary_fraction)

    @property
    def mamba_inner_size(self) -> int:
        return self.mamba_expand * self.hidden_size

    @property
    def mamba_n_heads(self) -> int:
        return self.mamba_inner_size // self.mamba_head_dim

    @property
    def attn_layer_indices(self) -> list[int]:
        return [i for i, c in enumerate(self.layer_pattern) if c == ATTENTION]

    # Construction --------------------------------------------------------------------
    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> "ModelConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
        fields = {**PRESETS[name], "name": name, **overrides}
        # A new ratio or placement means a new derived pattern, unless one is given.
        if ("attn_ratio" in overrides or "attn_placement" in overrides or "n_layers" in overrides) \
                and "layer_pattern" not in overrides:
            fields["layer_pattern"] = ""
        return cls(**fields)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"ModelConfig got unknown fields {unknown}")
        return cls(**data)


# Presets --------------------------------------------------------------------------------
# The four sizes of the seed project, at 8K context. MLP widths and embedding tying are
# chosen so that the built model lands within 5% of the seed's parameter counts
# (tests/model/test_config.py builds each on the meta device and checks).
_8K = dict(max_seq_len=8192, vocab_size=50304)
PRESETS: dict[str, dict[str, Any]] = {
    "1.3B": dict(_8K, hidden_size=2048, n_layers=24, n_heads=16, n_kv_heads=4, mlp_hidden_size=4864),
    "2.7B": dict(_8K, hidden_size=2560, n_layers=32, n_heads=20, n_kv_heads=4, mlp_hidden_size=4864),
    "6.7B": dict(_8K, hidden_size=4096, n_layers=32, n_heads=32, n_kv_heads=8, mlp_hidden_size=6912),
    "13B": dict(_8K, hidden_size=5120, n_layers=40, n_heads=40, n_kv_heads=8, mlp_hidden_size=7680),
    # Trains on a CPU in seconds; the default of `jobs/pretrain.py` on a laptop.
    "tiny": dict(vocab_size=4096, hidden_size=64, n_layers=4, n_heads=4, n_kv_heads=2,
                 mlp_hidden_size=128, max_seq_len=256, mamba_d_state=16, mamba_head_dim=16,
                 mamba_chunk_size=32, tie_embeddings=True),
    # Proxies for layout / learning-rate sweeps (~10M, ~50M, ~150M parameters).
    "proxy-10M": dict(vocab_size=8192, hidden_size=256, n_layers=8, n_heads=4, n_kv_heads=2,
                      mlp_hidden_size=640, max_seq_len=1024, mamba_d_state=64, mamba_head_dim=32,
                      mamba_chunk_size=64, tie_embeddings=True),
    "proxy-50M": dict(vocab_size=32768, hidden_size=512, n_layers=12, n_heads=8, n_kv_heads=2,
                      mlp_hidden_size=1280, max_seq_len=2048, mamba_d_state=64, mamba_head_dim=64,
                      mamba_chunk_size=128, tie_embeddings=True),
    "proxy-150M": dict(vocab_size=50304, hidden_size=768, n_layers=16, n_heads=12, n_kv_heads=4,
                       mlp_hidden_size=2048, max_seq_len=2048, mamba_d_state=128, mamba_head_dim=64,
                       tie_embeddings=True),
}
SEED_PARAMS = {"1.3B": 1.44e9, "2.7B": 2.56e9, "6.7B": 5.96e9, "13B": 10.66e9}
