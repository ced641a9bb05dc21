"""What a sweep varies (`SearchSpace`) and how one sampled point becomes a training run
(`TrialSettings`).

A trial's layout is one categorical `layout`: a placement rule of
`mamba_slm.model.config.PLACEMENTS` (the pattern is derived from `attn_ratio` for the
proxy's depth) or a verbatim pattern such as "AMMMAMMM" (then `attn_ratio` is unused).
The learning rate is log-uniform; warmup is a fraction of the trial's steps, so one space
fits any step budget. `model_choices` / `training_choices` sweep any other field of
`ModelConfig` / `TrainingConfig` over listed values (e.g. mamba_d_state=32,64,128).
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any

from mamba_slm.model import ModelConfig
from mamba_slm.model.config import ATTENTION, MAMBA, PLACEMENTS
from mamba_slm.platform.train.config import TrainingConfig

# Fields a trial sets itself; sweeping them through *_choices would be ambiguous.
RESERVED_MODEL = {"name", "vocab_size", "n_layers", "layer_pattern", "attn_ratio", "attn_placement",
                  "max_seq_len", "extra", "rope_scaling"}
RESERVED_TRAINING = {"name", "model_size", "max_steps", "schedule_steps", "lr", "warmup_steps",
                     "seq_len", "global_batch_size", "micro_batch_size", "checkpoint_every"}


def is_pattern(layout: str) -> bool:
    return bool(layout) and set(layout) <= {ATTENTION, MAMBA}


@dataclass
class SearchSpace:
    attn_ratios: list[float] = field(default_factory=lambda: [0.1, 0.2, 0.3, 0.5])
    placements: list[str] = field(default_factory=lambda: list(PLACEMENTS))
    patterns: list[str] = field(default_factory=list)  # verbatim, one letter per proxy layer
    lr_min: float = 3e-4
    lr_max: float = 1e-2
    warmup_fractions: list[float] = field(default_factory=lambda: [0.02, 0.05, 0.1])
    model_choices: dict[str, list] = field(default_factory=dict)
    training_choices: dict[str, list] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.patterns = [p.upper() for p in self.patterns]
        if not self.placements and not self.patterns:
            raise ValueError("SearchSpace: give at least one placement rule or verbatim pattern")
        bad = [p for p in self.placements if p not in PLACEMENTS]
        if bad:
            raise ValueError(f"SearchSpace.placements has {bad}: expected some of {list(PLACEMENTS)}")
        bad = [p for p in self.patterns if not is_pattern(p)]
        if bad:
            raise ValueError(f"SearchSpace.patterns has {bad}: use only 'A' (attention) and 'M' (Mamba-2)")
        if self.placements and not self.attn_ratios:
            raise ValueError("SearchSpace.attn_ratios is empty: placement rules need a ratio")
        if any(not 0.0 <= r <= 1.0 for r in self.attn_ratios):
            raise ValueError(f"SearchSpace.attn_ratios={self.attn_ratios}: each must be in [0, 1]")
        if not 0 < self.lr_min <= self.lr_max:
            raise ValueError(f"SearchSpace: need 0 < lr_min <= lr_max, got {self.lr_min}, {self.lr_max}")
        if not self.warmup_fractions or any(not 0 <= w < 1 for w in self.warmup_fractions):
            raise ValueError(f"SearchSpace.warmup_fractions={self.warmup_fractions}: each must be in [0, 1)")
        self.model_choices = _typed_choices(ModelConfig, self.model_choices, RESERVED_MODEL)
        self.training_choices = _typed_choices(TrainingConfig, self.training_choices, RESERVED_TRAINING)

    @property
    def layouts(self) -> list[str]:
        return list(self.placements) + list(self.patterns)

    def check_depth(self, n_layers: int) -> None:
        """Verbatim patterns must fit the proxy; rules must be placeable at each ratio."""
        from mamba_slm.model.config import derive_layer_pattern

        wrong = [p for p in self.patterns if len(p) != n_layers]
        if wrong:
            raise ValueError(f"--patterns {wrong}: the proxy has {n_layers} layers, give one letter per layer")
        for placement in self.placements:
            for ratio in self.attn_ratios:
                derive_layer_pattern(n_layers, ratio, placement)

    def param_space(self) -> dict[str, Any]:
        """Ray Tune distributions (every searcher, Optuna included, reads these)."""
        from ray import tune

        space: dict[str, Any] = {
            "layout": tune.choice(self.layouts),
            "lr": tune.loguniform(self.lr_min, self.lr_max) if self.lr_max > self.lr_min else self.lr_min,
            "warmup_fraction": tune.choice(self.warmup_fractions),
        }
        if self.placements:
            space["attn_ratio"] = tune.choice(self.attn_ratios)
        for prefix, choices in (("model.", self.model_choices), ("training.", self.training_choices)):
            for name, values in choices.items():
                space[prefix + name] = tune.choice(values)
        return space

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SearchSpace":
        return cls(**d)


@dataclass
class TrialSettings:
    """One sampled point, resolved for a proxy of `n_layers` layers."""

    layout: str
    attn_ratio: float | None
    lr: float
    warmup_fraction: float
    model: dict[str, Any]
    training: dict[str, Any]

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "TrialSettings":
        model = {k.split(".", 1)[1]: v for k, v in config.items() if k.startswith("model.")}
        training = {k.split(".", 1)[1]: v for k, v in config.items() if k.startswith("training.")}
        ratio = None if is_pattern(config["layout"]) else float(config["attn_ratio"])
        return cls(config["layout"], ratio, float(config["lr"]), float(config["warmup_fraction"]),
                   model, training)

    def model_overrides(self) -> dict[str, Any]:
        if is_pattern(self.layout):
            layout = {"layer_pattern": self.layout}
        else:
            layout = {"attn_ratio": self.attn_ratio, "attn_placement": self.layout}
        return {**self.model, **layout}

    def warmup_steps(self, total_steps: int) -> int:
        return round(self.warmup_fraction * total_steps)


def parse_choices(items: list[str]) -> dict[str, list[str]]:
    """`["mamba_d_state=32,64", ...]` -> {"mamba_d_state": ["32", "64"]} (typed later)."""
    out: dict[str, list[str]] = {}
    for item in items:
        name, sep, values = item.partition("=")
        if not sep or not name.strip() or not values.strip():
            raise ValueError(f"{item!r}: expected FIELD=V1,V2,... (e.g. mamba_d_state=32,64)")
        out[name.strip()] = [v.strip() for v in values.split(",") if v.strip()]
    return out


def _typed_choices(cls, choices: dict[str, list], reserved: set[str]) -> dict[str, list]:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    out = {}
    for name, values in choices.items():
        if name not in names:
            raise ValueError(f"{cls.__name__} has no field {name!r}; choose from {sorted(names - reserved)}")
        if name in reserved:
            raise ValueError(f"{cls.__name__}.{name} is set by the sweep itself (see its own flags)")
        if not values:
            raise ValueError(f"{cls.__name__}.{name}: give at least one value")
        out[name] = [_convert(hints[name], v, f"{cls.__name__}.{name}") for v in values]
    return out


def _convert(kind, value, where: str):
    if not isinstance(value, str):
        return value
    try:
        if kind is bool:
            if value.lower() not in ("true", "false", "1", "0"):
                raise ValueError(value)
            return value.lower() in ("true", "1")
        return kind(value) if kind in (int, float, str) else value
    except ValueError:
        raise ValueError(f"{where}: {value!r} is not a valid {getattr(kind, '__name__', kind)}") from None
