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
from mamba_slm.model.io import CONFIG_FILE, TOKENIZER_FILE

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


def _load_model(path: Path, device: str) -> HybridLM:
    from mamba_slm.platform.train.checkpoint import load_model

    try:
        return load_model(path, device=device).eval()
    except (FileNotFoundError, ValueError) as exc:
        raise CheckpointError(str(exc)) from exc


def _tokenizer_and_metadata(path: Path) -> tuple[Path | None, dict]:
    """Where a checkpoint's tokenizer is: beside the weights, in a final checkpoint's
    `model/`, or in the curated data dir named by a training checkpoint's train_state.json
    (a run directory: its latest checkpoint's)."""
    dirs = [path, path / "model"]
    state_files = [path / "train_state.json"]
    try:
        from mamba_slm.platform.train.checkpoint import latest_checkpoint
        latest = latest_checkpoint(path) or latest_checkpoint(path / "checkpoints")
        if latest is not None:
            dirs.append(latest / "model")
            state_files.append(latest / "train_state.json")
    except ImportError:
        pass
    for state_file in state_files:
        if state_file.is_file():
            data = json.loads(state_file.read_text()).get("config", {}).get("data", {})
            if isinstance(data, dict) and data.get("path"):
                dirs.append(Path(data["path"]))
    for d in dirs:
        if (d / TOKENIZER_FILE).is_file():
            meta = json.loads((d / CONFIG_FILE).read_text()) if (d / CONFIG_FILE).is_file() else {}
            return d / TOKENIZER_FILE, meta if isinstance(meta, dict) else {}
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
