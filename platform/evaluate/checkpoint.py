"""Load a model of this project for evaluation or export, whatever wrote it.

A `save_pretrained` directory (config.json + model.safetensors + tokenizer.json, the
final model of a training run), a quantized one (jobs/quantize.py), a DeepSpeed / Ray Train
checkpoint or a run directory: `mamba_slm.platform.train.checkpoint.load_model(path)` opens
each; this module adds the tokenizer and the end-of-text token.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer

from mamba_slm.model import HybridLM
from mamba_slm.model.io import CONFIG_FILE, TOKENIZER_FILE, WEIGHTS_FILE

EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>")


class CheckpointError(ValueError):
    """The path holds no model this project can load; the message says what to pass."""


@dataclass
class LoadedModel:
    model: HybridLM
    tokenizer: Tokenizer
    eos_id: int
    eos_token: str
    source: Path


def find_eos(tokenizer: Tokenizer, metadata: dict | None = None) -> tuple[int, str]:
    """The end-of-text token: the model dir's metadata `eos_id` when present, else the
    usual names among the tokenizer's special tokens (the curation's BPE has exactly one)."""
    if metadata and isinstance(metadata.get("eos_id"), int):
        idx = metadata["eos_id"]
        return idx, tokenizer.id_to_token(idx)
    for name in EOS_CANDIDATES:
        idx = tokenizer.token_to_id(name)
        if idx is not None:
            return idx, name
    specials = [t for t in tokenizer.get_added_tokens_decoder().values() if t.special]
    if len(specials) == 1:
        return tokenizer.token_to_id(specials[0].content), specials[0].content
    raise CheckpointError(f"cannot tell the tokenizer's end-of-text token (tried {EOS_CANDIDATES} "
                          f"and a single special token); add 'eos_id' to the model's config.json")


def resolve_device(name: str | None) -> str:
    """The torch device to evaluate on: `name` checked against this host, or cuda when
    one is available and else cpu. Raises ValueError saying what this host offers."""
    import torch

    cuda = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if name is None:
        return "cuda" if cuda else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ValueError(f"device {name!r} is not one of cpu, cuda, cuda:N")
    if device.type == "cuda" and not cuda:
        raise ValueError(f"device {name!r}: this host has no CUDA GPU (torch.cuda.is_available() is "
                         f"False); use cpu")
    if device.type == "cuda" and device.index is not None and device.index >= cuda:
        raise ValueError(f"device {name!r}: this host has {cuda} CUDA GPU(s), cuda:0 to cuda:{cuda - 1}")
    return name


def _is_model_dir(path: Path) -> bool:
    return (path / WEIGHTS_FILE).is_file() and (path / CONFIG_FILE).is_file()


def _train_state_files(path: Path) -> list[Path]:
    """train_state.json of a training checkpoint, or of a run directory's checkpoints
    (newest first, the way `load_model` picks them). Only the JSON is read: the SHA-256
    verification of a checkpoint's files (optimizer states included: ~100 GB for 6.7B)
    is left to `load_model`, which verifies the one whose weights it reads."""
    from mamba_slm.platform.fault.integrity import checkpoints_newest_first
    from mamba_slm.platform.train.checkpoint import STATE_FILE

    if (path / STATE_FILE).is_file():
        return [path / STATE_FILE]
    ckpts = checkpoints_newest_first(path) or checkpoints_newest_first(path / "checkpoints")
    return [c / STATE_FILE for c in ckpts if (c / STATE_FILE).is_file()]


def _read_config(state_file: Path) -> dict | None:
    """The job config saved in a train_state.json; None for a torn or unreadable one."""
    try:
        config = json.loads(state_file.read_text()).get("config")
    except (OSError, ValueError, AttributeError):
        return None
    return config if isinstance(config, dict) else None


def _refuse_checkpoint_without_model(path: Path) -> None:
    """A training checkpoint whose config names no model (a LoRA fine-tune's: its
    FinetuneJob config has `lora` and `checkpoint`, the base model, instead) cannot be
    opened as a model; say what to pass instead."""
    from mamba_slm.platform.train.checkpoint import STATE_FILE

    if _is_model_dir(path) or _is_model_dir(path / "model"):
        return
    config = next(filter(None, map(_read_config, _train_state_files(path))), None)
    if config is None or isinstance(config.get("model"), dict):
        return
    if "lora" in config:
        output = Path(str(config.get("output_dir") or "<output>"))
        merged = next((d / "model" for d in (output, *list(path.parents)[:3]) if _is_model_dir(d / "model")), None)
        hint = (f"--checkpoint {merged}" if merged else
                f"--checkpoint {output / 'model'} once the fine-tune has finished (it writes it at the end)")
        what = "is a LoRA fine-tune checkpoint" if (path / STATE_FILE).is_file() else \
            "holds LoRA fine-tune checkpoints"
        raise CheckpointError(
            f"{path} {what} (jobs/finetune.py): the adapter's training state, not a model. "
            f"Evaluate the merged model the fine-tune writes: {hint}")
    raise CheckpointError(f"{path} is a training checkpoint whose train_state.json names no model "
                          f"config: pass a model directory (config.json + model.safetensors)")


def _load_model(path: Path, device: str) -> HybridLM:
    from mamba_slm.platform.train.checkpoint import load_model

    _refuse_checkpoint_without_model(path)
    try:
        return load_model(path, device=device).eval()
    except (FileNotFoundError, ValueError) as exc:
        raise CheckpointError(str(exc)) from exc


def _tokenizer_and_metadata(path: Path) -> tuple[Path | None, dict]:
    """Where a checkpoint's tokenizer is: beside the weights, in a final checkpoint's
    `model/`, or in the curated data dir named by a training checkpoint's train_state.json
    (a run directory: its checkpoints', newest first). Only the first two are looked at
    when they have it, and no checkpoint file is hashed here."""
    def found(d: Path) -> tuple[Path, dict] | None:
        if not (d / TOKENIZER_FILE).is_file():
            return None
        meta = json.loads((d / CONFIG_FILE).read_text()) if (d / CONFIG_FILE).is_file() else {}
        return d / TOKENIZER_FILE, meta if isinstance(meta, dict) else {}

    for d in (path, path / "model"):
        if hit := found(d):
            return hit
    for state_file in _train_state_files(path):
        data = (_read_config(state_file) or {}).get("data")
        dirs = [state_file.parent / "model"]
        if isinstance(data, dict) and data.get("path"):
            dirs.append(Path(data["path"]))
        for d in dirs:
            if hit := found(d):
                return hit
    return None, {}


def load_checkpoint(path: str | Path, device: str = "cpu",
                    tokenizer_file: str | Path | None = None) -> LoadedModel:
    """Model (fp32, eval mode, on `device`) + its tokenizer: `tokenizer_file` when given,
    else the checkpoint's own (see `_tokenizer_and_metadata`)."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} does not exist or is not a directory")
    model = _load_model(path, device)
    found, metadata = _tokenizer_and_metadata(path)
    tok_path = Path(tokenizer_file) if tokenizer_file else found
    if tok_path is None or not tok_path.is_file():
        raise CheckpointError(f"no tokenizer.json found for {path}: pass --tokenizer <tokenizer.json> "
                              f"(the curated data dir has one)")
    tokenizer = Tokenizer.from_file(str(tok_path))
    eos_id, eos_token = find_eos(tokenizer, metadata)
    if tokenizer.get_vocab_size() > model.config.padded_vocab_size:
        raise CheckpointError(f"tokenizer {tok_path} has {tokenizer.get_vocab_size()} tokens but the "
                              f"model only {model.config.padded_vocab_size} embeddings: wrong tokenizer")
    return LoadedModel(model, tokenizer, eos_id, eos_token, path)
