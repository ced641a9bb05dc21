"""A tiny model trained for a few seconds on the shipped local tasks' own sentences, so
that it beats chance on them; and an untrained twin as the baseline."""
from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from mamba_slm.model import HybridLM, ModelConfig
from mamba_slm.model.io import save_pretrained
from mamba_slm.platform.evaluate.local_tasks import TASKS_DIR

EOS = "<|endoftext|>"
STEPS, BATCH, SEQ, LR = 80, 8, 64, 5e-3  # ~10 CPU-seconds; memorises all 68 facts


def fact_sentences() -> list[str]:
    rows = (TASKS_DIR / "data" / "facts.jsonl").read_text().splitlines()
    return [json.loads(r)["text"] for r in rows if r.strip()]


def train_tokenizer(texts: list[str]) -> Tokenizer:
    """Byte-level BPE with EOS as the only special token, as jobs/curate.py trains."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=512, special_tokens=[EOS], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tok


def train(model: HybridLM, docs: list[list[int]], eos: int, steps: int, seed: int = 0) -> list[float]:
    """Plain PyTorch loop over shuffled documents packed into rows, EOS before each."""
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    stream: list[int] = []
    losses = []
    model.train()
    for _ in range(steps):
        while len(stream) < BATCH * (SEQ + 1):
            for i in rng.sample(range(len(docs)), len(docs)):
                stream += [eos] + docs[i]
        rows = torch.tensor(stream[:BATCH * (SEQ + 1)]).view(BATCH, SEQ + 1)
        stream = stream[BATCH * (SEQ + 1):]
        loss = model(rows[:, :-1], labels=rows[:, 1:]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.fixture(scope="session")
def fact_texts() -> list[str]:
    return fact_sentences()


@pytest.fixture(scope="session")
def fact_models(tmp_path_factory):
    """(trained_dir, untrained_dir, losses): save_pretrained directories with tokenizer.json."""
    torch.manual_seed(0)
    texts = fact_sentences()
    tok = train_tokenizer(texts)
    eos = tok.token_to_id(EOS)
    # Two layers, one of each mixer: both paths are evaluated and exported.
    cfg = ModelConfig.from_name("tiny", vocab_size=tok.get_vocab_size(), max_seq_len=128, n_layers=2,
                                layer_pattern="MA")
    root = tmp_path_factory.mktemp("fact-models")
    tok.save(str(root / "tokenizer.json"))
    untrained = save_pretrained(HybridLM(cfg).eval(), root / "untrained", tokenizer_file=root / "tokenizer.json")
    model = HybridLM(cfg)
    losses = train(model, [tok.encode(t).ids for t in texts], eos, STEPS)
    trained = save_pretrained(model.eval(), root / "trained", tokenizer_file=root / "tokenizer.json",
                              metadata={"eos_id": eos})
    return trained, untrained, losses


def _load_job(name: str):
    """jobs/<name>.py as a module (jobs/ is not a package; `evaluate` would also clash
    with Hugging Face's `evaluate` package on sys.path)."""
    path = Path(__file__).resolve().parents[3] / "jobs" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"mamba_slm_job_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def evaluate_job():
    return _load_job("evaluate")


@pytest.fixture(scope="session")
def export_job():
    return _load_job("export_hf")
