"""Tokenizer for curation: load a named/pathed HF `tokenizers` tokenizer, or train a
byte-level BPE (GPT-2 style: byte alphabet, so no unknown tokens) on curated text."""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from mamba_slm.platform.data.plan import TokenizerConfig


def train_bpe(texts: Iterable[str], cfg: TokenizerConfig) -> Tokenizer:
    """Byte-level BPE with ``cfg.eos_token`` as the only special token (id 0)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size, special_tokens=[cfg.eos_token], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def load_tokenizer(cfg: TokenizerConfig) -> Tokenizer:
    """A tokenizer.json path, a folder holding one, or a hub name (needs a network)."""
    path = Path(cfg.name_or_path)
    if path.is_dir():
        path = path / "tokenizer.json"
    if path.is_file():
        return Tokenizer.from_file(str(path))
    try:
        return Tokenizer.from_pretrained(cfg.name_or_path)
    except Exception as exc:
        raise ValueError(
            f"tokenizer {cfg.name_or_path!r} is neither a tokenizer.json file nor reachable "
            f"on the Hugging Face hub ({exc}); pass a local path or train one (kind='train-bpe')"
        ) from exc


def eos_id(tok: Tokenizer, cfg: TokenizerConfig) -> int:
    idx = tok.token_to_id(cfg.eos_token)
    if idx is None:
        raise ValueError(f"tokenizer has no EOS token {cfg.eos_token!r}; set TokenizerConfig.eos_token")
    return idx
