"""Save and load a `HybridLM` as a plain directory: `config.json` + `model.safetensors`
(+ the tokenizer files beside them when given). The training job's final model, the
evaluation job and the exporters all use this one format."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .config import ModelConfig
from .hybrid import HybridLM

CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE = "config.json", "model.safetensors", "tokenizer.json"


def save_pretrained(model: HybridLM, path: str | Path, tokenizer_file: str | Path | None = None,
                    metadata: dict | None = None) -> Path:
    """Write config.json, model.safetensors (fp32: floating-point tensors of a bf16 or fp16
    model are upcast, so the directory has one format; tied weights stored once) and a copy
    of the tokenizer file. Writes into `path` directly; callers that need atomicity write
    to a temporary directory and rename."""
    reserved = sorted({"model", "quantization"} & set(metadata or {}))
    if reserved:  # "model" is the config itself; "quantization" marks save_quantized's directories
        raise ValueError(f"save_pretrained: metadata key(s) {reserved} are reserved for the model config; "
                         "put your values under other names")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {k: (v.float() if v.is_floating_point() else v).detach().to("cpu").contiguous()
             for k, v in model.state_dict().items()}
    if model.config.tie_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, str(path / WEIGHTS_FILE), metadata={"format": "pt"})
    (path / CONFIG_FILE).write_text(json.dumps(
        {"model": model.config.to_dict(), **(metadata or {})}, indent=2, sort_keys=True))
    if tokenizer_file is not None:
        shutil.copyfile(tokenizer_file, path / TOKENIZER_FILE)
    return path


def load_config(path: str | Path) -> ModelConfig:
    path = Path(path)
    if not (path / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"{path} has no {CONFIG_FILE}: not a mamba-slm model directory")
    return ModelConfig.from_dict(json.loads((path / CONFIG_FILE).read_text())["model"])


def load_pretrained(path: str | Path, device: str | torch.device = "cpu", **overrides) -> HybridLM:
    """Build the model from config.json (fields in `overrides` replace saved ones, e.g.
    ssm_path or rope_scaling) and load the weights strictly."""
    path = Path(path)
    cfg = load_config(path)
    if "quantization" in json.loads((path / CONFIG_FILE).read_text()):
        raise ValueError(f"{path} is a quantized model directory (jobs/quantize.py): open it with "
                         "mamba_slm.platform.train.checkpoint.load_model or "
                         "mamba_slm.platform.post.loading.load_model_dir")
    if overrides:
        cfg = ModelConfig.from_dict({**cfg.to_dict(), **overrides})
    with torch.device("meta"):
        model = HybridLM(cfg)
    state = load_file(str(path / WEIGHTS_FILE), device=str(device))
    if cfg.tie_embeddings:
        state["lm_head.weight"] = state["embed_tokens.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    # Buffers that are not saved (rotary inverse frequencies) are rebuilt on the device.
    for module in model.modules():
        if hasattr(module, "inv_freq") and module.inv_freq.is_meta:
            from .layers import rope_inv_freq
            module.register_buffer("inv_freq", rope_inv_freq(
                module.rotary_dim, cfg.rope_theta, cfg.rope_scaling, cfg.max_seq_len).to(device),
                persistent=False)
    return model.to(device).eval()
