"""Load a model of this project for evaluation or export, whatever wrote it.

- a `save_pretrained` directory (config.json + model.safetensors + tokenizer.json), the
  final model of a training run: `mamba_slm.model.io.load_pretrained`;
- anything else (a DeepSpeed / Ray Train checkpoint directory): the training platform's
  `mamba_slm.platform.train.checkpoint.load_model(path)`, which knows its layout.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer

from mamba_slm.model import HybridLM
from mamba_slm.model.io import CONFIG_FILE, TOKENIZER_FILE, WEIGHTS_FILE, load_pretrained

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


def is_pretrained_dir(path: Path) -> bool:
    return (path / CONFIG_FILE).is_file() and (path / WEIGHTS_FILE).is_file()


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


def _load_training_checkpoint(path: Path, device: str) -> HybridLM:
    try:
        from mamba_slm.platform.train.checkpoint import load_model
    except ImportError as exc:
        raise CheckpointError(
            f"{path} is not a save_pretrained model directory (no {CONFIG_FILE} + {WEIGHTS_FILE}) "
            f"and the training checkpoint loader mamba_slm.platform.train.checkpoint.load_model "
            f"is not available ({exc}); pass the final model directory of a run") from exc
    model = load_model(path)
    return model.to(device).eval()


def load_checkpoint(path: str | Path, device: str = "cpu",
                    tokenizer_file: str | Path | None = None) -> LoadedModel:
    """Model (fp32, eval mode, on `device`) + its tokenizer. The tokenizer is
    `tokenizer_file` when given, else tokenizer.json in the checkpoint directory."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} does not exist or is not a directory")
    metadata = {}
    if is_pretrained_dir(path):
        model = load_pretrained(path, device=device)
        metadata = json.loads((path / CONFIG_FILE).read_text())
    else:
        model = _load_training_checkpoint(path, device)
    tok_path = Path(tokenizer_file) if tokenizer_file else path / TOKENIZER_FILE
    if not tok_path.is_file():
        raise CheckpointError(f"no tokenizer at {tok_path}: pass --tokenizer <tokenizer.json> "
                              f"(the curated data dir has one)")
    tokenizer = Tokenizer.from_file(str(tok_path))
    eos_id, eos_token = find_eos(tokenizer, metadata)
    if tokenizer.get_vocab_size() > model.config.padded_vocab_size:
        raise CheckpointError(f"tokenizer {tok_path} has {tokenizer.get_vocab_size()} tokens but the "
                              f"model only {model.config.padded_vocab_size} embeddings: wrong tokenizer")
    return LoadedModel(model, tokenizer, eos_id, eos_token, path)
