"""Load a model directory (plain `save_pretrained` or `save_quantized`) with its tokenizer
and end-of-text id: the one loader of the post-training jobs."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer

from mamba_slm.model import HybridLM
from mamba_slm.model.io import CONFIG_FILE, TOKENIZER_FILE, WEIGHTS_FILE, load_pretrained
from mamba_slm.platform.evaluate.checkpoint import find_eos

from .quantize import check_device, cpu_only, is_quantized_dir, load_quantized


@dataclass
class LoadedModel:
    model: HybridLM
    tokenizer: Tokenizer
    eos_id: int
    path: Path
    quantized: bool

    @property
    def cpu_only(self) -> bool:
        return cpu_only(self.model)


def check_model_dir(path: str | Path) -> Path:
    """Raise a FileNotFoundError that says what a model directory must hold."""
    path = Path(path)
    missing = [f for f in (CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE) if not (path / f).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{path} is not a model directory (missing {', '.join(missing)}); pass the directory "
            f"written by save_pretrained (the final model of jobs/pretrain.py or jobs/finetune.py)")
    return path


def load_model_dir(path: str | Path, **config_overrides) -> LoadedModel:
    """Model on the CPU in eval mode + tokenizer. `config_overrides` (e.g. rope_scaling)
    replace config.json fields; quantized directories take none."""
    path = check_model_dir(path)
    metadata = json.loads((path / CONFIG_FILE).read_text())
    quantized = is_quantized_dir(path)
    if quantized:
        if config_overrides:
            raise ValueError(f"{path} is quantized; config overrides {sorted(config_overrides)} apply "
                             f"to float model directories only")
        model = load_quantized(path)
    else:
        model = load_pretrained(path, **config_overrides)
    tokenizer = Tokenizer.from_file(str(path / TOKENIZER_FILE))
    if tokenizer.get_vocab_size() > model.config.padded_vocab_size:
        raise ValueError(f"{path}: tokenizer has {tokenizer.get_vocab_size()} tokens but the model only "
                         f"{model.config.padded_vocab_size} embeddings")
    eos_id, _ = find_eos(tokenizer, metadata)  # config.json's eos_id, else the usual names
    return LoadedModel(model, tokenizer, eos_id, path, quantized)


def place(loaded: LoadedModel, device: str) -> None:
    """Move the model to `device` for inference: a GPU runs it in bf16 (an INT8 model's
    codes stay int8; its scales and unquantized parts become bf16, and a batch-1 step runs
    its INT8 GEMV); an INT4 model runs on a CPU only, so asking for a GPU is a ValueError."""
    if torch.device(device).type == "cpu":
        loaded.model.to(device)
        return
    check_device(loaded.model, device, loaded.path, "serve it with --device cpu")
    loaded.model.to(device, torch.bfloat16)
