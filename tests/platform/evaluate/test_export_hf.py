"""Export to transformers' BambaForCausalLM, load with no custom code, logits match,
import back."""
from __future__ import annotations

import json

import pytest
import torch

from mamba_slm.model import HybridLM, ModelConfig
from mamba_slm.model.io import load_pretrained, save_pretrained

ATOL = 1e-4


def test_export_load_generate_and_import_back(export_job, fact_models, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    trained = fact_models[0]
    hf_dir, back_dir = tmp_path / "hf", tmp_path / "back"
    assert export_job.main(["--checkpoint", str(trained), "--output", str(hf_dir)]) == 0
    assert "max |logit diff|" in capsys.readouterr().out
    config = json.loads((hf_dir / "config.json").read_text())
    assert config["architectures"] == ["BambaForCausalLM"] and config["model_type"] == "bamba"
    assert {"attn_layer_indices", "mamba_n_heads", "mamba_d_head", "mamba_d_state", "mamba_chunk_size"} <= set(config)
    assert (hf_dir / "model.safetensors").is_file() and not (hf_dir.parent / "hf.partial").exists()

    ours = load_pretrained(trained)
    bamba = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    assert type(bamba).__name__ == "BambaForCausalLM"
    ids = torch.randint(0, ours.config.vocab_size, (2, 45), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (ours(ids).logits - bamba(ids).logits).abs().max().item() < ATOL

    tok = AutoTokenizer.from_pretrained(hf_dir)
    enc = tok("The capital of Norway is", return_tensors="pt")
    out = bamba.generate(**enc, max_new_tokens=3, do_sample=False)
    assert out[0, enc.input_ids.shape[1]:].tolist() == ours.generate(enc.input_ids, 3, temperature=0)[0, -3:].tolist()
    assert tok.decode(out[0]).startswith("The capital of Norway is Oslo")

    assert export_job.main(["--from-hf", str(hf_dir), "--output", str(back_dir)]) == 0
    back = load_pretrained(back_dir)
    assert back.config == ours.config
    state, state_back = ours.state_dict(), back.state_dict()
    assert state.keys() == state_back.keys() and all(torch.equal(state[k], state_back[k]) for k in state)
    from tokenizers import Tokenizer
    text = "The opposite of up is down. A cow says moo."
    assert Tokenizer.from_file(str(back_dir / "tokenizer.json")).encode(text).ids == \
        Tokenizer.from_file(str(trained / "tokenizer.json")).encode(text).ids == tok(text).input_ids


def test_export_refuses_unexpressible_config_with_field_name(export_job, fact_models, tmp_path, capsys):
    model = HybridLM(ModelConfig.from_name("tiny", vocab_size=512, rotary_fraction=1.0))
    src = save_pretrained(model, tmp_path / "model", tokenizer_file=fact_models[0] / "tokenizer.json")
    rc = export_job.main(["--checkpoint", str(src), "--output", str(tmp_path / "hf")])
    err = capsys.readouterr().err
    assert rc == 2 and "rotary_fraction" in err and "Traceback" not in err
    assert not (tmp_path / "hf").exists()


def test_export_bad_arguments_exit_2(export_job, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        export_job.main(["--checkpoint", str(tmp_path / "missing"), "--output", str(tmp_path / "hf")])
    assert exc.value.code == 2 and "is not a directory" in capsys.readouterr().err


def test_export_refuses_all_mamba_pattern_and_leaves_nothing(export_job, fact_models, tmp_path, capsys):
    model = HybridLM(ModelConfig.from_name("tiny", vocab_size=512, attn_ratio=0.0))
    assert set(model.config.layer_pattern) == {"M"}
    src = save_pretrained(model, tmp_path / "model", tokenizer_file=fact_models[0] / "tokenizer.json")
    rc = export_job.main(["--checkpoint", str(src), "--output", str(tmp_path / "hf")])
    err = capsys.readouterr().err
    assert rc == 2 and "no attention layer" in err and "Traceback" not in err
    assert not (tmp_path / "hf").exists() and not (tmp_path / "hf.partial").exists()


def test_failed_export_removes_its_partial_directory(fact_models, tmp_path, monkeypatch):
    from mamba_slm.platform.evaluate import hf

    monkeypatch.setattr(hf, "LOGITS_ATOL", -1.0)  # the check after writing fails
    with pytest.raises(RuntimeError, match="not writing"):
        hf.export_hf(fact_models[0], tmp_path / "hf")
    assert not (tmp_path / "hf").exists() and not (tmp_path / "hf.partial").exists()


def test_import_of_a_non_bamba_directory_exits_2(export_job, fact_models, tmp_path, capsys):
    rc = export_job.main(["--from-hf", str(fact_models[0]), "--output", str(tmp_path / "back")])
    err = capsys.readouterr().err
    assert rc == 2 and "expected 'bamba'" in err and "already this project's model directory" in err
    assert "Traceback" not in err and not (tmp_path / "back").exists()
