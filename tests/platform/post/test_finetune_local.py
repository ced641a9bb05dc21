"""Fine-tunes run in this process (jobs/finetune.py --num-workers 0, Ray Train's local
mode): the merged model is fp32 after a bf16 run, a rerun writes a lost or half-written
final model, a resume under other settings is refused, bad steps stop the run, and the
step loss and token counts are those of the global batch's real tokens."""
from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import shutil
from pathlib import Path

import pytest
import torch

from mamba_slm.model.io import load_pretrained
from mamba_slm.platform.post.finetune import (FinetuneJob, LoraConfig, batch_token_counts, global_batch_rows,
                                              run_finetune, tokenize_chats)
from mamba_slm.platform.train.config import TrainingConfig

CHAT = Path(__file__).parent / "data" / "chat.jsonl"
ADAPTED = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "in_proj", "out_proj"}


def finetune_cli():
    spec = importlib.util.spec_from_file_location("finetune_job", Path(__file__).parents[3] / "jobs" / "finetune.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cli_args(model_dir: Path, out: Path, eval_data: Path, *extra: str) -> list[str]:
    return ["--checkpoint", str(model_dir), "--data", str(CHAT), "--output", str(out), "--max-steps", "3",
            "--lr", "3e-2", "--global-batch-size", "4", "--micro-batch-size", "2", "--num-workers", "0",
            "--lora-rank", "4", "--eval-data", str(eval_data), *extra]


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of jobs/finetune.py's main in this process."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = finetune_cli().main(argv)
        except SystemExit as exc:
            code = exc.code
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def finished(tiny_model_dir, tmp_path_factory):
    """A 3-step fine-tune through the CLI, its --eval-data sharing 3 conversations with --data."""
    root = tmp_path_factory.mktemp("ft-local")
    lines = CHAT.read_text().splitlines()
    eval_data = root / "eval.jsonl"
    eval_data.write_text("\n".join(lines[:3] + ['{"messages": [{"role": "user", "content": "Unseen?"}, '
                                                '{"role": "assistant", "content": "Yes."}]}']) + "\n")
    argv = cli_args(tiny_model_dir, root / "sft", eval_data)
    code, stdout, stderr = run_cli(argv)
    assert code == 0, stdout[-2000:] + stderr[-2000:]
    return {"out": root / "sft", "argv": argv, "stdout": stdout, "stderr": stderr, "eval_data": eval_data}


def copy_run(finished, dest: Path) -> list[str]:
    """The finished run's checkpoints and metrics under `dest`, without model/ and adapter/
    (as if it had stopped after its final checkpoint); -> its CLI arguments for `dest`."""
    shutil.copytree(finished["out"] / "checkpoints", dest / "checkpoints")
    shutil.copy(finished["out"] / "metrics.jsonl", dest / "metrics.jsonl")
    argv = list(finished["argv"])
    argv[argv.index("--output") + 1] = str(dest)
    return argv


def metrics_of(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_eval_data_shared_with_training_is_warned(finished):
    assert "warning: 3 of the 4 --eval-data conversations are also in --data" in finished["stderr"]
    assert "3 steps of 4 (= 0.60 passes)" in finished["stdout"]


def test_step_loss_is_per_assistant_token_and_tokens_are_real(finished, tiny_model_dir):
    """Step 1's loss is the base model's loss per assistant token over its 4 conversations
    (micro-batches of 2 with uneven assistant tokens: a mean of their means differs), and
    tokens_seen / assistant_tokens count the global batch's real tokens, not batch x longest."""
    job = FinetuneJob(str(tiny_model_dir), str(CHAT), "/tmp/x", TrainingConfig(seq_len=1))
    examples, _ = tokenize_chats(job)
    metrics = metrics_of(finished["out"])
    seed = 0  # jobs/finetune.py's default --seed
    rows = global_batch_rows(len(examples), 0, 4, seed)
    base = load_pretrained(tiny_model_dir)
    total = n = 0.0
    with torch.no_grad():
        for r in rows:
            x, y = examples[r]
            k = sum(t != -100 for t in y)
            total, n = total + base(torch.tensor([x]), labels=torch.tensor([y])).loss.item() * k, n + k
    assert metrics[0]["loss"] == pytest.approx(total / n, abs=1e-4)
    seen = 0
    for m in metrics:
        tokens, assistant = batch_token_counts(examples, global_batch_rows(len(examples), 4 * (m["step"] - 1), 4, seed))
        seen += tokens
        assert (m["tokens_seen"], m["assistant_tokens"]) == (seen, assistant)


def test_rerun_of_a_finished_run_writes_its_lost_model(finished, tmp_path):
    argv = copy_run(finished, tmp_path / "sft")
    code, stdout, stderr = run_cli(argv)
    assert code == 0, stdout[-2000:] + stderr[-2000:]
    assert [m["step"] for m in metrics_of(tmp_path / "sft")] == [1, 2, 3]  # no step redone
    rerun, first = load_pretrained(tmp_path / "sft" / "model"), load_pretrained(finished["out"] / "model")
    for name, w in first.state_dict().items():
        assert torch.equal(w, rerun.state_dict()[name]), name
    assert (tmp_path / "sft" / "adapter" / "adapter_model.safetensors").is_file()


def test_crash_while_saving_leaves_no_partial_model(finished, tmp_path, monkeypatch):
    import mamba_slm.platform.post.finetune as finetune

    def half_written(model, path, **kwargs):
        Path(path).mkdir(parents=True)
        (Path(path) / "config.json").write_text("{}")
        raise OSError("disk full")

    argv = copy_run(finished, tmp_path / "sft")
    monkeypatch.setattr(finetune, "save_pretrained", half_written)
    with pytest.raises(Exception, match="disk full"):
        finetune_cli().main(argv)
    assert not (tmp_path / "sft" / "model").exists() and not (tmp_path / "sft" / "adapter").exists()
    monkeypatch.undo()
    code, stdout, stderr = run_cli(argv)  # the rerun is not refused, and writes it
    assert code == 0, stdout[-2000:] + stderr[-2000:]
    assert (tmp_path / "sft" / "model" / "model.safetensors").is_file()
    assert not list((tmp_path / "sft").glob(".tmp-*"))


@pytest.mark.parametrize("change", [["--lora-rank", "8"], ["--checkpoint"], ["--data"]])
def test_resume_under_other_settings_is_refused(finished, tmp_path, tiny_model_dir, change):
    """The checkpoint holds the frozen base and the adapters: a rerun with another base,
    data or LoRA setting would go on training the old ones, so it exits 2 and says why."""
    argv = copy_run(finished, tmp_path / "sft")
    if change == ["--checkpoint"]:
        shutil.copytree(tiny_model_dir, tmp_path / "other-base")
        change = ["--checkpoint", str(tmp_path / "other-base")]
    elif change == ["--data"]:
        shutil.copy(CHAT, tmp_path / "other.jsonl")
        change = ["--data", str(tmp_path / "other.jsonl")]
    code, _, stderr = run_cli(argv + change)  # argparse: the last value of a flag wins
    assert code == 2
    assert "different fine-tune" in stderr and change[0] in stderr.split("differs in")[-1], stderr[-1500:]
    assert not (tmp_path / "sft" / "model").exists()


def test_bad_steps_stop_the_fine_tune(finished, tmp_path, tiny_model_dir, monkeypatch):
    """max_bad_steps (5) skipped steps in a row end the run with a checkpoint and no model."""
    import mamba_slm.platform.train.loop as loop

    real_step = loop.train_step

    def failing_after_one(engine, batches, state, cfg):
        if state.step == 0:
            return real_step(engine, batches, state, cfg)
        return loop.StepResult(loss=float("nan"), lr=0.0, grad_norm=None, applied=False,
                               skip_reason="non-finite loss")

    monkeypatch.setattr(loop, "train_step", failing_after_one)
    argv = cli_args(tiny_model_dir, tmp_path / "sft", finished["eval_data"])
    argv[argv.index("--max-steps") + 1] = "20"
    code, stdout, stderr = run_cli(argv)
    assert code == 1, stdout[-2000:] + stderr[-2000:]
    assert "5 bad steps in a row" in stderr
    assert [m["step"] for m in metrics_of(tmp_path / "sft")] == [1, 2, 3, 4, 5, 6]
    assert (tmp_path / "sft" / "checkpoints" / "finetune" / "step_00000006").is_dir()
    assert not (tmp_path / "sft" / "model").exists()


def test_bf16_run_merges_in_fp32(tiny_model_dir, tmp_path):
    """Under bf16 DeepSpeed casts the whole module, frozen base included, to bf16: the merged
    model must still hold the base's fp32 weights where no adapter is, and base + the
    adapters' fp32 master copies where one is."""
    from peft import PeftModel
    from safetensors import safe_open
    from safetensors.torch import load_file

    out = tmp_path / "sft"
    training = TrainingConfig(name="finetune", seq_len=68, max_steps=2, global_batch_size=4, micro_batch_size=2,
                              lr=3e-2, warmup_steps=0, precision="bf16", spike_factor=0.0, seed=0)
    run_finetune(FinetuneJob(str(tiny_model_dir), str(CHAT), str(out), training, LoraConfig(rank=4),
                             num_workers=0))
    with safe_open(str(out / "model" / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float32}
    base, tuned = load_pretrained(tiny_model_dir).state_dict(), load_pretrained(out / "model")
    for name, w in base.items():
        changed = not torch.equal(w, tuned.state_dict()[name])
        assert changed == (name.split(".")[-2] in ADAPTED and name.endswith(".weight")), name
    adapter = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert all(v.dtype == torch.float32 for v in adapter.values())
    assert any(not torch.equal(v, v.bfloat16().float()) for v in adapter.values())  # masters, not bf16 copies
    with_adapter = PeftModel.from_pretrained(load_pretrained(tiny_model_dir), str(out / "adapter")).eval()
    ids = torch.randint(0, 500, (1, 40))
    with torch.no_grad():
        torch.testing.assert_close(with_adapter(ids).logits, tuned(ids).logits, atol=1e-5, rtol=1e-5)
