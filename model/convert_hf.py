"""Checkpoint conversion between this project's `HybridLM` and transformers'
`BambaForCausalLM` (IBM/Princeton/UIUC, transformers `models/bamba/`).

A pure mapping, both directions, of the config (ModelConfig <-> BambaConfig fields as a
plain dict) and of the state dict (names only; tensors pass through untouched). No
transformers import here: the exporter in `mamba_slm.platform.evaluate.hf` builds the
Bamba model from these dicts.

The model was designed to map one to one (see `hybrid.py`):
    embed_tokens            <-> model.embed_tokens
    layers.N.input_layernorm, pre_ff_layernorm, feed_forward.{gate,up,down}_proj
                            <-> model.layers.N.(same)
    layers.N.mixer.*  (M)   <-> model.layers.N.mamba.*      (in_proj [z|xBC|dt], conv1d,
                                                             dt_bias, A_log, D, norm, out_proj)
    layers.N.mixer.*  (A)   <-> model.layers.N.self_attn.*  (q/k/v/o_proj, no biases)
    final_norm              <-> model.final_layernorm
    lm_head                 <-> lm_head   (tie_embeddings <-> tie_word_embeddings)
Semantics checked against transformers 5.24 `modeling_bamba.py`: RoPE on the first half
of each head (`partial_rotary_factor` is hardcoded to 0.5 in `BambaConfig`), rotate-half
convention; no dt clamp (`time_step_limit` = (0, inf)); one `rms_norm_eps` for every norm;
the gated norm multiplies by silu(z) before normalising; the vocabulary is the padded one.
"""
from __future__ import annotations

import math
from typing import Any

from .config import ATTENTION, MAMBA, ModelConfig

BAMBA_PARTIAL_ROTARY_FACTOR = 0.5  # BambaConfig.__post_init__ hardcodes it
CONFIG_KEY = "mamba_slm_config"    # our full ModelConfig, kept in the HF config for an exact import
_ROPE_TYPES = {"linear": "linear"}  # ours -> transformers rope_type, where the maths agree


class UnsupportedConversion(ValueError):
    """A configuration that one of the two formats cannot express; the message names the field."""


def _check_exportable(cfg: ModelConfig) -> None:
    if ATTENTION not in cfg.layer_pattern:
        # transformers' Bamba asks its cache for the sequence length through an attention
        # layer (HybridMambaAttentionDynamicCache.get_seq_length), even in a plain forward.
        raise UnsupportedConversion(
            f"ModelConfig.layer_pattern={cfg.layer_pattern!r} has no attention layer: "
            f"BambaForCausalLM needs at least one (its forward fails without); export a hybrid "
            f"model (attn_ratio > 0), or use this project's model directory as it is")
    if ATTENTION in cfg.layer_pattern and cfg.rotary_fraction != BAMBA_PARTIAL_ROTARY_FACTOR:
        raise UnsupportedConversion(
            f"ModelConfig.rotary_fraction={cfg.rotary_fraction}: BambaForCausalLM always rotates "
            f"half of each head (partial_rotary_factor={BAMBA_PARTIAL_ROTARY_FACTOR}, hardcoded)")
    if cfg.rope_scaling and cfg.rope_scaling.get("type") not in _ROPE_TYPES:
        raise UnsupportedConversion(
            f"ModelConfig.rope_scaling={cfg.rope_scaling}: only {sorted(_ROPE_TYPES)} has the same "
            f"maths in transformers ('ntk' and this project's 'yarn' (no attention temperature) do "
            f"not); export without rope_scaling and set it in the HF config by hand if you accept "
            f"the difference")


def to_bamba_config(cfg: ModelConfig, *, eos_token_id: int | None = None,
                    bos_token_id: int | None = None, pad_token_id: int | None = None) -> dict[str, Any]:
    """ModelConfig -> kwargs of `transformers.BambaConfig`. Raises UnsupportedConversion."""
    _check_exportable(cfg)
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": float(cfg.rope_theta)}
    if cfg.rope_scaling:
        rope.update(rope_type=_ROPE_TYPES[cfg.rope_scaling["type"]], factor=float(cfg.rope_scaling["factor"]))
    return {
        "architectures": ["BambaForCausalLM"],
        "model_type": "bamba",
        "vocab_size": cfg.padded_vocab_size,  # the embedding rows; logits beyond vocab_size are padding
        "tie_word_embeddings": cfg.tie_embeddings,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.mlp_hidden_size,
        "num_hidden_layers": cfg.n_layers,
        "attn_layer_indices": cfg.attn_layer_indices,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "hidden_act": "silu",
        "initializer_range": cfg.init_std,
        "rms_norm_eps": cfg.norm_eps,
        "max_position_embeddings": cfg.max_seq_len,
        "rope_parameters": rope,
        "attention_bias": False,
        "mlp_bias": False,
        "mamba_n_heads": cfg.mamba_n_heads,
        "mamba_d_head": cfg.mamba_head_dim,
        "mamba_n_groups": cfg.mamba_n_groups,
        "mamba_d_state": cfg.mamba_d_state,
        "mamba_d_conv": cfg.mamba_d_conv,
        "mamba_expand": cfg.mamba_expand,
        "mamba_chunk_size": cfg.mamba_chunk_size,
        "mamba_conv_bias": cfg.mamba_conv_bias,
        "mamba_proj_bias": cfg.mamba_proj_bias,
        "time_step_limit": [0.0, float("inf")],
        "eos_token_id": eos_token_id,
        "bos_token_id": bos_token_id,
        "pad_token_id": pad_token_id,
        CONFIG_KEY: cfg.to_dict(),
    }


def _as_float(value: Any) -> float:
    """transformers writes inf into config.json as {"__float__": "Infinity"}."""
    return float(value["__float__"]) if isinstance(value, dict) else float(value)


def _require(hf: dict[str, Any], key: str, expected: Any, why: str) -> None:
    value = hf.get(key, expected)
    if value != expected:
        raise UnsupportedConversion(f"Bamba config {key}={value!r}: {why}")


def from_bamba_config(hf: dict[str, Any], vocab_size: int | None = None) -> ModelConfig:
    """BambaConfig dict -> ModelConfig. Our own exports carry the exact ModelConfig
    (CONFIG_KEY); other Bamba checkpoints are mapped field by field. `vocab_size` (the
    tokenizer's) marks the rows past it as padding; default: all rows are real."""
    rope = dict(hf.get("rope_parameters") or {"rope_type": "default", "rope_theta": hf.get("rope_theta", 10_000.0)})
    if rope.get("rope_type", "default") not in ("default", *(_ROPE_TYPES.values())):
        raise UnsupportedConversion(f"Bamba config rope_parameters.rope_type={rope['rope_type']!r}: "
                                    f"only 'default' and {sorted(_ROPE_TYPES.values())} are supported")
    _require(hf, "hidden_act", "silu", "HybridLM's MLP is SwiGLU (silu)")
    _require(hf, "attention_bias", False, "HybridLM's attention has no biases")
    _require(hf, "mlp_bias", False, "HybridLM's MLP has no biases")
    limit = [_as_float(x) for x in hf.get("time_step_limit") or (0.0, math.inf)]
    if limit != [0.0, math.inf]:
        raise UnsupportedConversion(f"Bamba config time_step_limit={limit}: HybridLM does not clamp dt")
    if CONFIG_KEY in hf:
        return ModelConfig.from_dict(hf[CONFIG_KEY])
    n_layers, hidden = int(hf["num_hidden_layers"]), int(hf["hidden_size"])
    attn = set(hf.get("attn_layer_indices") or [])
    n_mamba_heads = int(hf["mamba_n_heads"])
    d_head = hf.get("mamba_d_head", "auto")
    d_head = hf["mamba_expand"] * hidden // n_mamba_heads if d_head in ("auto", None) else int(d_head)
    padded = int(hf["vocab_size"])
    scaling = None
    if rope.get("rope_type", "default") != "default":
        scaling = {"type": rope["rope_type"], "factor": float(rope["factor"])}
    return ModelConfig(
        name="bamba-import", vocab_size=vocab_size or padded,
        pad_vocab_multiple=64 if vocab_size and math.ceil(vocab_size / 64) * 64 == padded else padded,
        hidden_size=hidden, n_layers=n_layers,
        layer_pattern="".join(ATTENTION if i in attn else MAMBA for i in range(n_layers)),
        n_heads=int(hf["num_attention_heads"]),
        n_kv_heads=int(hf.get("num_key_value_heads") or hf["num_attention_heads"]),
        rotary_fraction=BAMBA_PARTIAL_ROTARY_FACTOR, rope_theta=float(rope.get("rope_theta", 10_000.0)),
        rope_scaling=scaling, max_seq_len=int(hf.get("max_position_embeddings", 8192)),
        mamba_expand=int(hf["mamba_expand"]), mamba_d_state=int(hf["mamba_d_state"]),
        mamba_d_conv=int(hf["mamba_d_conv"]), mamba_head_dim=d_head,
        mamba_n_groups=int(hf.get("mamba_n_groups", 1)), mamba_chunk_size=int(hf["mamba_chunk_size"]),
        mamba_conv_bias=bool(hf.get("mamba_conv_bias", True)),
        mamba_proj_bias=bool(hf.get("mamba_proj_bias", False)),
        mlp_hidden_size=int(hf["intermediate_size"]), norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        init_std=float(hf.get("initializer_range", 0.02)))


def _mixer_name(cfg: ModelConfig, layer: int) -> str:
    return "self_attn" if cfg.layer_pattern[layer] == ATTENTION else "mamba"


def to_bamba_name(name: str, cfg: ModelConfig) -> str:
    """'layers.3.mixer.in_proj.weight' -> 'model.layers.3.mamba.in_proj.weight', etc."""
    if name == "lm_head.weight":
        return name
    if name == "final_norm.weight":
        return "model.final_layernorm.weight"
    parts = name.split(".")
    if parts[0] == "layers" and parts[2] == "mixer":
        parts[2] = _mixer_name(cfg, int(parts[1]))
    return "model." + ".".join(parts)


def from_bamba_name(name: str) -> str:
    if name == "lm_head.weight":
        return name
    if not name.startswith("model."):
        raise UnsupportedConversion(f"unexpected Bamba weight {name!r}")
    name = name[len("model."):]
    if name == "final_layernorm.weight":
        return "final_norm.weight"
    parts = name.split(".")
    if parts[0] == "layers" and parts[2] in ("mamba", "self_attn"):
        parts[2] = "mixer"
    return ".".join(parts)


def to_bamba_state_dict(state: dict, cfg: ModelConfig) -> dict:
    """Rename a HybridLM state dict for BambaForCausalLM (tied lm_head kept out)."""
    return {to_bamba_name(k, cfg): v for k, v in state.items()
            if not (k == "lm_head.weight" and cfg.tie_embeddings)}


def from_bamba_state_dict(state: dict, cfg: ModelConfig) -> dict:
    """Rename a BambaForCausalLM state dict for HybridLM (tied lm_head restored)."""
    out = {from_bamba_name(k): v for k, v in state.items()
           if not (k == "lm_head.weight" and cfg.tie_embeddings)}
    if cfg.tie_embeddings:
        out["lm_head.weight"] = out["embed_tokens.weight"]
    return out
