"""Held-out perplexity on a curated-format split; the offline message of the job."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer

from mamba_slm.model.io import load_pretrained
from mamba_slm.platform.evaluate import perplexity


L = 32


def write_curated(root: Path, tokenizer_file: Path, texts: list[str], eos: int) -> Path:
    """A `mamba-slm-packed-v1` dir (BRIEF's format) with the documents packed into a
    val split of two shards: rows of L+1 tokens, doc_ids restarting at 0 in each row."""
    tok = Tokenizer.from_file(str(tokenizer_file))
    stream, docs = [], []
    for d, text in enumerate(texts):
        ids = tok.encode(text).ids + [eos]
        stream += ids
        docs += [d] * len(ids)
    n_rows = len(stream) // (L + 1)
    ids = np.array(stream[:n_rows * (L + 1)], dtype=np.int32).reshape(n_rows, L + 1)
    doc = np.array(docs[:n_rows * (L + 1)], dtype=np.int32).reshape(n_rows, L + 1)
    doc -= doc[:, :1]
    (root / "val").mkdir(parents=True)
    shards = []
    for s, part in enumerate(np.array_split(np.arange(n_rows), 2)):
        path = f"val/shard-{s:05d}.parquet"
        pq.write_table(pa.table({"input_ids": [list(map(int, r)) for r in ids[part]],
                                 "doc_ids": [list(map(int, r)) for r in doc[part]]}), root / path)
        shards.append({"path": path, "rows": len(part), "tokens": len(part) * L, "sha256": ""})
    (root / "manifest.json").write_text(json.dumps({
        "format": "mamba-slm-packed-v1", "seq_len": L, "vocab_size": tok.get_vocab_size(), "eos_id": eos,
        "tokenizer": "tokenizer.json", "splits": {"val": {"shards": shards, "rows": n_rows, "tokens": n_rows * L}}}))
    return root, ids, doc


def test_perplexity_matches_direct_computation(fact_models, fact_texts, tmp_path):
    trained, untrained, _ = fact_models
    eos = json.loads((trained / "config.json").read_text())["eos_id"]
    data, ids, doc = write_curated(tmp_path / "data", trained / "tokenizer.json", fact_texts, eos)
    model = load_pretrained(trained)
    model.train()
    result = perplexity(model, data, split="val", batch_size=5)
    assert model.training  # put back as it was
    assert result["rows"] == len(ids) and result["tokens"] == len(ids) * L
    with torch.no_grad():
        x = torch.from_numpy(ids).long()
        logits = load_pretrained(trained)(x[:, :-1], seq_idx=torch.from_numpy(doc[:, :-1]).int()).logits
        loss = F.cross_entropy(logits[..., :model.config.vocab_size].flatten(0, 1), x[:, 1:].flatten()).item()
    assert result["loss"] == pytest.approx(loss, rel=1e-4) and result["ppl"] == pytest.approx(math.exp(loss), rel=1e-4)
    capped = perplexity(model, data, split="val", batch_size=2, max_batches=1)
    assert capped["rows"] == 2 and capped["tokens"] == 2 * L
    base = perplexity(load_pretrained(untrained), data)
    assert result["ppl"] < base["ppl"] / 10
    with pytest.raises(ValueError, match="no split 'train'"):
        perplexity(model, data, split="train")


def test_job_perplexity(evaluate_job, fact_models, fact_texts, tmp_path, capsys):
    trained = fact_models[0]
    data, _, _ = write_curated(tmp_path / "data", trained / "tokenizer.json", fact_texts, 0)
    out = tmp_path / "ppl.json"
    assert evaluate_job.main(["--checkpoint", str(trained), "--perplexity", str(data), "--output", str(out)]) == 0
    assert "perplexity on" in capsys.readouterr().out
    report = json.loads(out.read_text())["mamba_slm"]["perplexity"]
    assert report["split"] == "val" and report["ppl"] == pytest.approx(math.exp(report["loss"]))


def test_offline_standard_tasks_exit_2_naming_them(evaluate_job, fact_models, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rc = evaluate_job.main(["--checkpoint", str(fact_models[0]), "--benchmarks", "hellaswag,ARC-Easy,local"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "hellaswag" in err and "arc_easy" in err and "mamba_slm_facts_mc" not in err
    assert "--benchmarks local" in err and "Traceback" not in err


@pytest.mark.parametrize("args, message", [
    (["--benchmarks", "nope"], "unknown ['nope']"),
    (["--benchmarks", "humaneval"], "--allow-code-execution"),
    ([], "nothing to do"),
    (["--perplexity", "/nonexistent"], "no manifest.json"),
])
def test_job_bad_arguments_exit_2(evaluate_job, fact_models, args, message, capsys):
    with pytest.raises(SystemExit) as exc:
        evaluate_job.main(["--checkpoint", str(fact_models[0]), *args])
    assert exc.value.code == 2 and message in capsys.readouterr().err


def _zero3_worker(rank: int, world: int, data: str) -> tuple[dict, dict]:
    from mamba_slm.model import ModelConfig
    from mamba_slm.platform.train.checkpoint import gather_full_state_dict
    from mamba_slm.platform.train.config import TrainingConfig
    from mamba_slm.platform.train.engine import build_engine

    cfg = TrainingConfig(zero_stage=3, global_batch_size=2 * world, micro_batch_size=2, seed=5)
    engine, _ = build_engine(ModelConfig.from_name("tiny", vocab_size=256), cfg, world, use_gpu=False)
    result = perplexity(engine, data, split="val", batch_size=2)
    state = gather_full_state_dict(engine, rank)
    return result, {k: v.numpy() for k, v in state.items()}


def test_perplexity_of_a_zero3_engine_with_unequal_rows_per_rank(spawn_ranks, tmp_path):
    """5 rows in batches of 2 over 2 ranks: rank 0 runs 2 forwards, rank 1 one. Each ZeRO-3
    forward gathers weights with the other rank, so the ranks must step together."""
    from mamba_slm.model import HybridLM, ModelConfig
    from mamba_slm.platform.train.synthetic import write_synthetic_dataset

    data = write_synthetic_dataset(tmp_path / "data", seq_len=32, vocab_size=256, train_rows=8, val_rows=5,
                                   shards=1, row_group=8)
    results = spawn_ranks(_zero3_worker, 2, str(data), timeout_s=180)
    assert results[0][0] == results[1][0] and results[0][0]["rows"] == 5
    model = HybridLM(ModelConfig.from_name("tiny", vocab_size=256))
    model.load_state_dict({k: torch.from_numpy(v) for k, v in results[0][1].items()}, strict=False)
    expected = perplexity(model, data, split="val", batch_size=2)
    assert results[0][0]["loss"] == pytest.approx(expected["loss"], rel=1e-5)
    assert results[0][0]["tokens"] == expected["tokens"] == 5 * 32


def test_job_perplexity_refuses_data_of_another_tokenizer(evaluate_job, fact_models, fact_texts, tmp_path, capsys):
    """Another vocabulary size is refused (it was an IndexError), and so is a tokenizer of
    the same size that gives other ids (it gave meaningless numbers), both naming the two."""
    trained = fact_models[0]
    vocab = load_pretrained(trained).config.vocab_size
    data, _, _ = write_curated(tmp_path / "data", trained / "tokenizer.json", fact_texts, 0)
    manifest = json.loads((data / "manifest.json").read_text())
    (data / "manifest.json").write_text(json.dumps({**manifest, "vocab_size": 8192}))
    assert evaluate_job.main(["--checkpoint", str(trained), "--perplexity", str(data)]) == 2
    err = capsys.readouterr().err
    assert "8192-token vocabulary" in err and f"has {vocab} tokens" in err and "Traceback" not in err
    with pytest.raises(ValueError, match="8192-token vocabulary"):
        perplexity(load_pretrained(trained), data)

    (data / "manifest.json").write_text(json.dumps(manifest))
    tok = json.loads((trained / "tokenizer.json").read_text())
    swapped = dict(tok["model"]["vocab"])
    a, b = (t for t, i in swapped.items() if i in (300, 301))  # two merged tokens trade ids
    swapped[a], swapped[b] = swapped[b], swapped[a]
    (data / "tokenizer.json").write_text(json.dumps({**tok, "model": {**tok["model"], "vocab": swapped}}))
    assert evaluate_job.main(["--checkpoint", str(trained), "--perplexity", str(data)]) == 2
    err = capsys.readouterr().err
    assert "not " in err and "tokenizer" in err and f"same size {vocab}" in err and "2 tokens" in err

    (data / "tokenizer.json").write_text((trained / "tokenizer.json").read_text())  # the model's own: accepted
    assert evaluate_job.main(["--checkpoint", str(trained), "--perplexity", str(data)]) == 0


def test_job_device_is_checked(evaluate_job, fact_models, monkeypatch, capsys):
    from mamba_slm.platform.evaluate.checkpoint import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for device, message in [("bogus", "not one of cpu, cuda, cuda:N"), ("cuda", "no CUDA GPU")]:
        with pytest.raises(SystemExit) as exc:
            evaluate_job.main(["--checkpoint", str(fact_models[0]), "--benchmarks", "local", "--device", device])
        err = capsys.readouterr().err
        assert exc.value.code == 2 and f"--device: device {device!r}" in err and message in err
    assert resolve_device(None) == "cpu" and resolve_device("cpu") == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device(None) == "cuda" and resolve_device("cuda:1") == "cuda:1"
    with pytest.raises(ValueError, match="has 2 CUDA GPU"):
        resolve_device("cuda:2")
