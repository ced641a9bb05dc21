"""lm-eval runs the shipped local tasks on a tiny trained checkpoint, fully offline."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import yaml

from mamba_slm.platform.evaluate import load_checkpoint
from mamba_slm.platform.evaluate.local_tasks import materialize, task_files



def test_materialized_tasks_have_absolute_existing_data(tmp_path):
    out = materialize(tmp_path / "tasks")
    assert len(task_files()) == 3
    kinds = set()
    for path in out.glob("*.yaml"):
        config = yaml.safe_load(path.read_text())
        kinds.add(config["output_type"])
        for data in config["dataset_kwargs"]["data_files"].values():
            assert os.path.isabs(data) and Path(data).is_file()
    assert kinds == {"multiple_choice", "loglikelihood_rolling", "generate_until"}


def run_local(evaluate_job, model_dir: Path, out: Path, capsys) -> dict:
    rc = evaluate_job.main(["--checkpoint", str(model_dir), "--benchmarks", "local", "--output", str(out),
                            "--batch-size", "16", "--bootstrap-iters", "0", "--device", "cpu"])
    assert rc == 0, capsys.readouterr().err
    return json.loads(out.read_text())


def test_local_tasks_offline_beat_chance(evaluate_job, fact_models, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    trained, untrained, losses = fact_models
    assert losses[-1] < losses[0] / 4
    good = run_local(evaluate_job, trained, tmp_path / "trained.json", capsys)
    table = capsys.readouterr().out
    assert "Facts MC" in table and "GPT-3 (seed)" in table
    base = run_local(evaluate_job, untrained, tmp_path / "untrained.json", capsys)
    r, b = good["results"], base["results"]
    assert r["mamba_slm_facts_mc"]["acc,none"] >= 0.6        # 4 choices: chance is 0.25
    assert b["mamba_slm_facts_mc"]["acc,none"] <= 0.5
    assert r["mamba_slm_facts_gen"]["exact_match,strip"] >= 0.5
    assert b["mamba_slm_facts_gen"]["exact_match,strip"] == 0.0
    assert r["mamba_slm_facts_ppl"]["word_perplexity,none"] < b["mamba_slm_facts_ppl"]["word_perplexity,none"] / 20
    rows = {row["task"]: row for row in good["mamba_slm"]["table"]}
    assert rows["mamba_slm_facts_mc"]["score"] == pytest.approx(100 * r["mamba_slm_facts_mc"]["acc,none"])


def _request(*args):
    from lm_eval.api.instance import Instance
    return Instance(request_type="loglikelihood", doc={}, arguments=args, idx=0)


def test_scores_equal_direct_computation_and_batching(fact_models):
    from mamba_slm.platform.evaluate.lm import MambaSlmLM
    loaded = load_checkpoint(fact_models[0])
    lm1, lm8 = MambaSlmLM(loaded=loaded, batch_size=1), MambaSlmLM(loaded=loaded, batch_size=8)
    reqs = [_request("The capital of France is", " Paris"), _request("A cow says", " moo"),
            _request("The opposite of hot is", " cold and the colour of snow is white"), _request("", "Hello")]
    one, eight = lm1.loglikelihood(reqs, disable_tqdm=True), lm8.loglikelihood(reqs, disable_tqdm=True)
    for (a, ga), (b, gb) in zip(one, eight):
        assert a == pytest.approx(b, abs=1e-4) and ga == gb
    # Direct: sum of log p(continuation token | prefix), from one unpadded forward pass.
    tok, model = loaded.tokenizer, loaded.model
    ctx, whole = tok.encode("The capital of France is").ids, tok.encode("The capital of France is Paris").ids
    with torch.no_grad():
        logp = model(torch.tensor([whole[:-1]])).logits[0, :, :model.config.vocab_size].log_softmax(-1)
    direct = sum(logp[i - 1, whole[i]].item() for i in range(len(ctx), len(whole)))
    assert one[0][0] == pytest.approx(direct, abs=1e-4)
    assert one[0][1] is True  # the trained model's greedy answer is Paris
    # Rolling: a short document = EOS-prefixed single window.
    text = "The capital of Italy is Rome. A dog says woof."
    (rolling,) = lm8.loglikelihood_rolling([_request(text)], disable_tqdm=True)
    ids = [loaded.eos_id] + tok.encode(text).ids
    with torch.no_grad():
        logp = model(torch.tensor([ids[:-1]])).logits[0, :, :model.config.vocab_size].log_softmax(-1)
    assert rolling == pytest.approx(sum(logp[i, ids[i + 1]].item() for i in range(len(ids) - 1)), abs=1e-3)


def test_generate_until_batches_match_single(fact_models):
    from lm_eval.api.instance import Instance
    from mamba_slm.platform.evaluate.lm import MambaSlmLM
    loaded = load_checkpoint(fact_models[0])
    gen = {"until": ["."], "max_gen_toks": 6, "do_sample": False}
    prompts = ["The capital of Japan is", "The capital of Spain is", "A duck says", "The colour of snow is"]
    reqs = [Instance(request_type="generate_until", doc={}, arguments=(p, gen), idx=0) for p in prompts]
    batched = MambaSlmLM(loaded=loaded, batch_size=8).generate_until(reqs, disable_tqdm=True)
    single = MambaSlmLM(loaded=loaded, batch_size=1).generate_until(reqs, disable_tqdm=True)
    assert batched == single
    assert [s.strip() for s in batched] == ["Tokyo", "Madrid", "quack", "white"]


@pytest.mark.parametrize("max_gen_toks", [4, 16, 40])
def test_generate_until_fits_prompt_and_budget_in_max_length(fact_models, max_gen_toks):
    """A generation budget at or past max_length keeps the prompt's last tokens (never
    none, never all of a prompt that overflows) and caps the budget to what fits."""
    from lm_eval.api.instance import Instance
    from mamba_slm.platform.evaluate.lm import MambaSlmLM
    lm = MambaSlmLM(loaded=load_checkpoint(fact_models[0]), max_length=16)
    context = "The capital of Japan is Tokyo. The capital of Spain is Madrid. The capital of Italy is"
    enc = lm.tok_encode(context)
    assert len(enc) > 16
    seen = []
    generate = lm._generate
    lm._generate = lambda prompts, gen, max_new: seen.append((prompts[0], max_new)) or generate(prompts, gen, max_new)
    gen = {"until": ["."], "max_gen_toks": max_gen_toks}
    req = Instance(request_type="generate_until", doc={}, arguments=(context, gen), idx=0)
    assert isinstance(lm.generate_until([req], disable_tqdm=True)[0], str)
    prompt, max_new = seen[0]
    assert max_new == min(max_gen_toks, 15) and len(prompt) + max_new == 16
    assert prompt == enc[-len(prompt):]
