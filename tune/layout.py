"""Carry a sweep's winning layout to the model that is really trained
(`jobs/pretrain.py --layout-from <sweep dir>`).

A proxy has fewer layers than the target (tiny: 4, proxy-50M: 12, 1.3B: 24), so the
proxy's pattern itself only transfers when the depths match. Otherwise what transfers is
the rule: the attention fraction the proxy trained with and its placement rule, from
which `ModelConfig` derives the target's pattern (`derive_layer_pattern`). A verbatim
pattern has no rule; for a deeper target the file's `rule_fallback` (the best
rule-derived trial of the same sweep) is used instead, and the choice is logged.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .results import BEST_FILE, LAYOUT_FORMAT


def read_layout(path: str | Path) -> dict[str, Any]:
    """`path` is a sweep directory or its best_layout.json."""
    path = Path(path)
    file = path / BEST_FILE if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"--layout-from {path}: no {BEST_FILE} there (a finished sweep "
                                "writes it; run jobs/tune_sweep.py first, or --resume it)")
    d = json.loads(file.read_text())
    if d.get("format") != LAYOUT_FORMAT:
        raise ValueError(f"--layout-from {file}: format {d.get('format')!r}, expected {LAYOUT_FORMAT!r}")
    return d


def layout_overrides(layout: dict[str, Any], target_n_layers: int, log=print) -> dict[str, Any]:
    """ModelConfig overrides that put the sweep's layout on a model of `target_n_layers`."""
    if layout["n_layers"] == target_n_layers:
        chosen, how = {"layer_pattern": layout["layer_pattern"]}, "verbatim (same depth)"
    elif layout["attn_placement"] is not None:
        chosen = {"attn_ratio": layout["attn_ratio"], "attn_placement": layout["attn_placement"]}
        how = f"re-derived for {target_n_layers} layers from the proxy's {layout['n_layers']}"
    elif layout.get("rule_fallback"):
        fb = layout["rule_fallback"]
        chosen = {"attn_ratio": fb["attn_ratio"], "attn_placement": fb["attn_placement"]}
        how = (f"the winner {layout['layer_pattern']} is a verbatim {layout['n_layers']}-layer pattern; "
               f"using the best placement rule of the sweep ({fb['layer_pattern']}, val loss "
               f"{fb['val_loss']:.4f}) re-derived for {target_n_layers} layers")
    else:
        raise ValueError(
            f"--layout-from: the sweep's best layout {layout['layer_pattern']} is a verbatim "
            f"{layout['n_layers']}-layer pattern and the target has {target_n_layers} layers; give "
            "--layer-pattern yourself, or sweep placement rules too")
    log(f"layout from sweep {layout.get('sweep')} ({layout['proxy']}): {how}")
    return chosen


def apply_layout(model_overrides: dict[str, Any], layout_from: str | Path, model_size: str,
                 log=print) -> dict[str, Any]:
    """`model_overrides` plus the sweep's layout for preset `model_size` (what
    `jobs/pretrain.py --layout-from` calls). Other swept model fields (e.g. mamba_d_state)
    carry over as well; learning rates do not (they do not transfer across sizes without
    a muP-style parametrisation, so the file's `training` part is informational)."""
    from mamba_slm.model import ModelConfig

    layout = read_layout(layout_from)
    target = ModelConfig.from_name(model_size, **model_overrides)
    chosen = layout_overrides(layout, target.n_layers, log=log)
    merged = {**model_overrides, **layout.get("model_overrides", {}), **chosen}
    pattern = ModelConfig.from_name(model_size, **merged).layer_pattern  # validates here, not on a worker
    log(f"layer pattern of {model_size}: {pattern}")
    return merged
