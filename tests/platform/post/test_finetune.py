"""LoRA SFT: the chat template masks everything but assistant tokens; a real 2-worker
Ray Train run through jobs/finetune.py lowers the assistant loss, touches only the
adapted projections, and the merged model equals base + adapter; its checkpoints are
written in place in the storage directory and sealed, as pretraining's are."""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mamba_slm.model.io import load_pretrained
from mamba_slm.platform.fault.integrity import verify_checkpoint
from mamba_slm.platform.post.chat import encode_conversation, load_chat_jsonl, prompt_ids
from mamba_slm.platform.post.finetune import FinetuneJob, step_micro_batches
from mamba_slm.platform.post.loading import load_model_dir
from mamba_slm.platform.train.config import TrainingConfig

CHAT = Path(__file__).parent / "data" / "chat.jsonl"


def test_template_masks_all_but_assistant_answers(tiny_model_dir):
    loaded = load_model_dir(tiny_model_dir)
    tok, eos = loaded.tokenizer, loaded.eos_id
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."},
                {"role": "assistant", "content": "Blue."}, {"role": "user", "content": "Another?"},
                {"role": "assistant", "content": "Red."}]
    enc = encode_conversation(tok, messages, eos)
    learned = [t for t, m in zip(enc.ids, enc.loss_mask) if m]
    assert learned == tok.encode("Blue.").ids + [eos] + tok.encode("Red.").ids + [eos]
    assert tok.decode(enc.ids).startswith("<|system|>\nBe brief.\n<|user|>\nName a colour.\n<|assistant|>\nBlue.")
    inputs, labels = enc.inputs_and_labels()
    assert len(inputs) == len(labels) == len(enc.ids) - 1
    assert [y for y in labels if y != -100] == learned
    # Serving builds the prompt from the same segments.
    prompt = prompt_ids(tok, messages[:2], eos)
    assert enc.ids[: len(prompt)] == prompt


def test_chat_jsonl_errors_name_the_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n'
                   '{"messages": [{"role": "narrator", "content": "x"}]}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: message 0"):
        load_chat_jsonl(bad)
    assert len(load_chat_jsonl(CHAT)) == 20


def test_workers_split_each_global_batch():
    examples = [([i, i], [i, -100]) for i in range(10)]
    cfg = TrainingConfig(global_batch_size=4, micro_batch_size=1, seq_len=2, seed=3)
    rows = [sorted(int(r) for b in step_micro_batches(examples, 8, cfg, rank, 2, 0) for r in b.sample_ids)
            for rank in range(2)]
    assert not set(rows[0]) & set(rows[1]) and len(rows[0]) == len(rows[1]) == 2
    again = [int(r) for b in step_micro_batches(examples, 8, cfg, 0, 2, 0) for r in b.sample_ids]
    assert sorted(again) == rows[0]  # deterministic: a resumed worker sees the same rows


def assistant_loss(model, job_examples) -> float:
    losses = []
    with torch.no_grad():
        for x, y in job_examples:
            losses.append(model(torch.tensor([x]), labels=torch.tensor([y])).loss.item())
    return sum(losses) / len(losses)


def token_weighted_loss(model, examples) -> float:
    """Loss per assistant token over all conversations (what val_loss reports)."""
    total = tokens = 0.0
    with torch.no_grad():
        for x, y in examples:
            n = sum(t != -100 for t in y)
            total += model(torch.tensor([x]), labels=torch.tensor([y])).loss.item() * n
            tokens += n
    return total / tokens


def finetune_job(repo_root: Path, model_dir: Path, out: Path, max_steps: int, workers: int) -> None:
    """`python jobs/finetune.py` on the test chats (LoRA rank 4, 4 conversations a step),
    the same chats as the held-out set every 4 steps."""
    proc = subprocess.run(
        [sys.executable, "jobs/finetune.py", "--checkpoint", str(model_dir), "--data", str(CHAT),
         "--output", str(out), "--max-steps", str(max_steps), "--lr", "3e-2", "--global-batch-size", "4",
         "--micro-batch-size", "2", "--num-workers", str(workers), "--lora-rank", "4",
         "--eval-data", str(CHAT), "--eval-every", "4"],
        cwd=repo_root, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.mark.ray
@pytest.mark.slow
def test_finetune_job_two_workers(ray_cluster, tiny_model_dir, tmp_path, repo_root):
    out = tmp_path / "sft"
    finetune_job(repo_root, tiny_model_dir, out, max_steps=8, workers=2)
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, 9))
    assert all(m["assistant_tokens"] > 0 for m in metrics)
    storage = out / "checkpoints" / "finetune"  # written in place: sealed by both workers, nothing left over
    assert sorted(p.name for p in storage.iterdir() if p.is_dir()) == ["step_00000008"]
    assert verify_checkpoint(storage / "step_00000008") == ""
    assert json.loads((storage / "step_00000008" / "integrity_rank1.json").read_text())["world"] == 2

    base, tuned = load_pretrained(tiny_model_dir), load_pretrained(out / "model")
    meta = json.loads((out / "model" / "config.json").read_text())
    assert meta["eos_id"] == 0 and meta["finetune"]["step"] == 8
    base_sd, tuned_sd = base.state_dict(), tuned.state_dict()
    adapted = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "in_proj", "out_proj"}
    for name, w in base_sd.items():
        changed = not torch.equal(w, tuned_sd[name])
        assert changed == (name.split(".")[-2] in adapted and name.endswith(".weight")), name

    # The merged model is base + adapter (peft), and it learned the assistant answers.
    from peft import PeftModel

    with_adapter = PeftModel.from_pretrained(load_pretrained(tiny_model_dir), str(out / "adapter")).eval()
    ids = torch.randint(0, 500, (1, 40))
    with torch.no_grad():
        torch.testing.assert_close(with_adapter(ids).logits, tuned(ids).logits, atol=1e-4, rtol=1e-4)
    job = FinetuneJob(str(tiny_model_dir), str(CHAT), str(out), TrainingConfig(seq_len=1))
    from mamba_slm.platform.post.finetune import tokenize_chats

    examples, _ = tokenize_chats(job)
    assert assistant_loss(tuned, examples) < assistant_loss(base, examples) - 0.2
    # val_loss at steps 4 and 8, over both workers' halves: the final one is the merged model's
    assert [m["step"] for m in metrics if "val_loss" in m] == [4, 8]
    assert metrics[7]["val_loss"] < metrics[3]["val_loss"]
    assert metrics[7]["val_loss"] == pytest.approx(token_weighted_loss(tuned, examples), abs=1e-3)
    assert metrics[7]["val_tokens"] == sum(sum(t != -100 for t in y) for _, y in examples)

    # As if the run had been stopped after its step-8 checkpoint (no final model yet) and
    # resubmitted on one worker (a spot node gone): it resumes the 2-worker checkpoint
    # through DeepSpeed's universal format and goes on from step 9.
    for final in ("model", "adapter"):
        shutil.rmtree(out / final)
    finetune_job(repo_root, tiny_model_dir, out, max_steps=10, workers=1)
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps[-2:] == [9, 10] and 1 not in steps[8:], steps
    assert json.loads((storage / "step_00000010" / "integrity_rank0.json").read_text())["world"] == 1
    assert json.loads((out / "model" / "config.json").read_text())["finetune"]["step"] == 10


def test_held_out_fraction_is_disjoint_and_the_same_on_every_call(tiny_model_dir):
    from mamba_slm.platform.post.finetune import tokenize_chats, train_and_eval_examples

    job = FinetuneJob(str(tiny_model_dir), str(CHAT), "/tmp/x", TrainingConfig(seq_len=1, seed=5), eval_fraction=0.25)
    split = train_and_eval_examples(job)
    train, held = split.train, split.held_out
    everything, _ = tokenize_chats(job)
    assert len(held) == round(0.25 * len(everything)) and len(train) + len(held) == len(everything)
    assert not {str(x) for x, _ in train} & {str(x) for x, _ in held}
    assert train_and_eval_examples(job).held_out == held  # the seed decides
    with pytest.raises(ValueError, match="eval_fraction"):
        FinetuneJob(str(tiny_model_dir), str(CHAT), "/tmp/x", TrainingConfig(seq_len=1), eval_fraction=1.0)
    with pytest.raises(ValueError, match="not both"):
        FinetuneJob(str(tiny_model_dir), str(CHAT), "/tmp/x", TrainingConfig(seq_len=1), eval_data=str(CHAT),
                    eval_fraction=0.1)


def test_held_out_fraction_keeps_duplicates_on_one_side(tiny_model_dir, tmp_path):
    """Exact duplicates (anywhere in the file) are held out together or trained on together."""
    from mamba_slm.platform.post.finetune import train_and_eval_examples

    lines = CHAT.read_text().splitlines()
    dup = tmp_path / "dup.jsonl"
    dup.write_text("\n".join(lines + lines[::-1] + lines[5:]) + "\n")
    for seed in range(4):
        job = FinetuneJob(str(tiny_model_dir), str(dup), "/tmp/x", TrainingConfig(seq_len=1, seed=seed),
                          eval_fraction=0.2)
        split = train_and_eval_examples(job)
        assert not {str(x) for x, _ in split.train} & {str(x) for x, _ in split.held_out}, seed
        assert len({str(x) for x, _ in split.held_out}) == 4  # 20% of the 20 distinct conversations


def test_eval_data_shared_with_training_is_counted(tiny_model_dir, tmp_path):
    from mamba_slm.platform.post.finetune import train_and_eval_examples

    lines = CHAT.read_text().splitlines()
    ev = tmp_path / "eval.jsonl"
    ev.write_text("\n".join(lines[:3] + ['{"messages": [{"role": "user", "content": "Unseen?"}, '
                                         '{"role": "assistant", "content": "Yes."}]}']) + "\n")
    job = FinetuneJob(str(tiny_model_dir), str(CHAT), "/tmp/x", TrainingConfig(seq_len=1), eval_data=str(ev))
    split = train_and_eval_examples(job)
    assert (len(split.held_out), split.shared) == (4, 3)


def finetune_cli():
    spec = importlib.util.spec_from_file_location("finetune_job", Path(__file__).parents[3] / "jobs" / "finetune.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cli_job(tmp_path, *extra: str, data: Path = CHAT, model_dir: Path | None = None):
    cli = finetune_cli()
    parser = cli.build_parser()
    args = parser.parse_args(["--checkpoint", str(model_dir), "--data", str(data), "--output",
                              str(tmp_path / "out"), *extra])
    return cli.make_job(args, parser)


@pytest.mark.parametrize("epochs, steps", [(1, 2), (3, 4), (0.5, 1), (8 / 9, 1)])
def test_epochs_are_whole_passes(tiny_model_dir, tmp_path, epochs, steps):
    """9 conversations, 8 a step: ceil(epochs x 9 / 8) steps (3 epochs were 6 steps, 5.3 passes)."""
    nine = tmp_path / "nine.jsonl"
    nine.write_text("\n".join(CHAT.read_text().splitlines()[:9]) + "\n")
    job, _ = cli_job(tmp_path, "--epochs", str(epochs), "--global-batch-size", "8", data=nine,
                     model_dir=tiny_model_dir)
    assert job.training.max_steps == steps


@pytest.mark.parametrize("extra, message", [
    (["--global-batch-size", "0"], "--global-batch-size 0: must be >= 1"),
    (["--epochs", "inf"], "--epochs inf: must be a positive finite"),
    (["--epochs", "nan"], "--epochs nan"),
    (["--max-seq-len", "-5"], "--max-seq-len -5: must be >= 0"),
    (["--max-seq-len", "100000"], "--max-seq-len 100000 exceeds the model's context of 256"),
    (["--lora-alpha", "0"], "LoraConfig.alpha=0.0"),
    (["--cpus-per-worker", "0"], "--cpus-per-worker 0.0"),
    (["--max-failures", "-1"], "--max-failures"),
    (["--weight-decay", "nan"], "--weight-decay"),
])
def test_bad_arguments_exit_2_with_a_message(tiny_model_dir, tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as exc:
        cli_job(tmp_path, *extra, model_dir=tiny_model_dir)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_resume_mismatch_names_what_differs(tiny_model_dir):
    from mamba_slm.platform.post.finetune import LoraConfig, resume_mismatch

    job = FinetuneJob(str(tiny_model_dir), str(CHAT), "/tmp/x", TrainingConfig(seq_len=1))
    saved = json.loads(json.dumps(job.to_dict()))  # as in train_state.json
    assert resume_mismatch(saved, dataclasses.replace(job, training=TrainingConfig(seq_len=1, max_steps=7))) == ""
    other = dataclasses.replace(job, checkpoint="/elsewhere", lora=LoraConfig(rank=4))
    why = resume_mismatch(saved, other)
    assert "--checkpoint" in why and "/elsewhere" in why and "--lora-rank" in why and "--data" not in why


def test_loss_per_assistant_token_does_not_depend_on_micro_batch_size(tiny_model_dir):
    """The step's objective (the mean of the rescaled micro-batch losses, what DeepSpeed's
    gradient accumulation and the worker average compute) is the loss per assistant token."""
    from mamba_slm.platform.post.finetune import (PerAssistantTokenLoss, batch_token_counts, padded_batch,
                                                  tokenize_chats)

    job = FinetuneJob(str(tiny_model_dir), str(CHAT), "/tmp/x", TrainingConfig(seq_len=1))
    examples, eos = tokenize_chats(job)
    rows = [0, 3, 7, 11]
    assert len({batch_token_counts(examples, [r])[1] for r in rows}) > 1  # uneven: a plain mean would differ
    model = load_pretrained(tiny_model_dir)
    want = token_weighted_loss(model, [examples[r] for r in rows])
    with torch.no_grad():
        for micro in (1, 2, 4):
            per_token = PerAssistantTokenLoss(model, micro_batches_per_step=len(rows) // micro)
            per_token.step_tokens = batch_token_counts(examples, rows)[1]
            losses = [per_token(mb.input_ids, labels=mb.labels).loss.item()
                      for mb in (padded_batch(examples, rows[i:i + micro], eos) for i in range(0, 4, micro))]
            assert sum(losses) / len(losses) == pytest.approx(want, abs=1e-5), micro


def test_save_pretrained_writes_fp32(tmp_path):
    from safetensors import safe_open

    from mamba_slm.model import HybridLM, ModelConfig
    from mamba_slm.model.io import save_pretrained

    model = HybridLM(ModelConfig.from_name("tiny", vocab_size=512, ssm_path="reference")).to(torch.bfloat16)
    save_pretrained(model, tmp_path / "m")
    with safe_open(str(tmp_path / "m" / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float32}
    assert torch.equal(load_pretrained(tmp_path / "m").embed_tokens.weight, model.embed_tokens.weight.float())


def test_held_out_loss_is_the_loss_per_assistant_token(tiny_model_dir):
    from mamba_slm.platform.post.finetune import held_out_loss, tokenize_chats

    job = FinetuneJob(str(tiny_model_dir), str(CHAT), "/tmp/x", TrainingConfig(seq_len=1))
    examples, eos = tokenize_chats(job)
    model = load_pretrained(tiny_model_dir).train()
    model.device = torch.device("cpu")  # what held_out_loss reads of a DeepSpeed engine
    got = held_out_loss(model, examples, micro_batch=3, rank=0, world=1, pad_id=eos)
    assert model.training  # put back
    assert got["val_loss"] == pytest.approx(token_weighted_loss(model.eval(), examples), abs=1e-5)
