"""jobs/generate.py: a bad --device or --tokenizer is exit 2 with a message (they were
tracebacks), and generation stops at the tokenizer's end-of-text token whatever it is
called (`</s>` as well as `<|endoftext|>`), as in jobs/serve.py and jobs/evaluate.py."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="module")
def generate_job():
    spec = importlib.util.spec_from_file_location("generate_job", Path(__file__).parents[3] / "jobs" / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_main(job, capsys, *argv) -> tuple[int, str, str]:
    try:
        code = job.main(list(argv))
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_generates_from_a_model_dir(generate_job, tiny_model_dir, capsys):
    code, out, _ = run_main(generate_job, capsys, "--checkpoint", str(tiny_model_dir), "--prompt", "ROMEO:",
                            "--max-new-tokens", "4", "--temperature", "0", "--device", "cpu")
    assert code == 0 and out.startswith("ROMEO:")


@pytest.mark.parametrize("args, needle", [
    (["--device", "gpu"], "argument --device: invalid choice: 'gpu'"),
    (["--device", "cuda"], "--device cuda: no CUDA device is visible here; use --device cpu"),
    (["--tokenizer", "{model}/config.json"], "config.json is not a tokenizer.json"),
    (["--temperature", "1e-40"], "--temperature must be 0 (greedy) or a finite number >= 1e-06"),
    (["--temperature", "nan"], "--temperature must be 0"),
    (["--top-p", "1e-50"], "--top-p must be in [1e-06, 1]"),
    (["--repetition-penalty", "inf"], "--repetition-penalty a finite number"),
])
def test_bad_device_or_tokenizer_is_exit_2(generate_job, tiny_model_dir, capsys, monkeypatch, args, needle):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a CPU-only host, on any machine
    args = [a.format(model=tiny_model_dir) for a in args]
    code, _, err = run_main(generate_job, capsys, "--checkpoint", str(tiny_model_dir), "--prompt", "x", *args)
    assert code == 2 and needle in err, err


def test_tokenizer_of_another_model_is_exit_2(generate_job, tiny_model_dir, tmp_path, capsys):
    from tokenizers import Tokenizer, models

    big = Tokenizer(models.WordLevel({f"w{i}": i for i in range(5000)}, unk_token="w0"))
    big.save(str(tmp_path / "tokenizer.json"))
    code, _, err = run_main(generate_job, capsys, "--checkpoint", str(tiny_model_dir), "--prompt", "w1",
                            "--tokenizer", str(tmp_path / "tokenizer.json"), "--device", "cpu")
    assert code == 2 and "has 5000 tokens but the model only 512 embeddings" in err, err


def test_eos_is_found_by_its_usual_names(generate_job, tmp_path):
    from tokenizers import Tokenizer, models

    tok = Tokenizer(models.WordLevel({"<unk>": 0, "hello": 1, "</s>": 2}, unk_token="<unk>"))
    (tmp_path / "config.json").write_text('{"model": {}}')  # no eos_id: the tokenizer decides
    assert generate_job.eos_id_of(tmp_path, tok) == 2
    (tmp_path / "config.json").write_text('{"eos_id": 1, "model": {}}')
    assert generate_job.eos_id_of(tmp_path, tok) == 1
    plain = Tokenizer(models.WordLevel({"<unk>": 0, "hello": 1}, unk_token="<unk>"))
    (tmp_path / "config.json").write_text('{"model": {}}')
    assert generate_job.eos_id_of(tmp_path, plain) is None  # none: generate --max-new-tokens
