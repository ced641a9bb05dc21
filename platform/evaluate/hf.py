"""Export to (and import from) a Hugging Face `BambaForCausalLM` directory.

    export_hf("runs/x/final", "runs/x/hf")    # config.json, model.safetensors, tokenizer files
    transformers.AutoModelForCausalLM.from_pretrained("runs/x/hf")   # no custom code
    import_hf("runs/x/hf", "runs/x/back")     # back to this project's save_pretrained format

The name and config mapping is `mamba_slm.model.convert_hf`; this module does the I/O and
checks the result: after export the Bamba model's logits are compared with ours on random
tokens (CPU, fp32), and the export is refused if they differ by more than LOGITS_ATOL.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file

from mamba_slm.model import HybridLM
from mamba_slm.model.convert_hf import (UnsupportedConversion, from_bamba_config, from_bamba_state_dict,
                                        to_bamba_config, to_bamba_state_dict)
from mamba_slm.model.io import TOKENIZER_FILE, save_pretrained

from .checkpoint import CheckpointError, LoadedModel, load_checkpoint

# fp32 on CPU: the two implementations differ only in summation order (measured max
# |diff| ~2e-7 for logits of magnitude ~1 on the tiny preset); 1e-4 leaves room for depth.
LOGITS_ATOL = 1e-4
EXPORT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@torch.no_grad()
def max_logit_diff(ours: HybridLM, bamba, seq_len: int = 77, batch: int = 3, seed: int = 0) -> float:
    """Max |logits difference| on random tokens (both models on CPU, fp32, eval mode); the
    default length is not a multiple of any preset's chunk size, so the SSD's padded last
    chunk is exercised too."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, ours.config.vocab_size, (batch, min(seq_len, ours.config.max_seq_len)), generator=g)
    return (ours(ids).logits.float() - bamba(ids).logits.float()).abs().max().item()


def build_bamba(model: HybridLM, eos_id: int | None = None):
    """A transformers BambaForCausalLM holding `model`'s weights (shared storage)."""
    from transformers import BambaConfig, BambaForCausalLM
    cfg = model.config
    hf_config = BambaConfig(**to_bamba_config(cfg, eos_token_id=eos_id, bos_token_id=eos_id, pad_token_id=eos_id))
    with torch.device("meta"):
        bamba = BambaForCausalLM(hf_config)
    state = to_bamba_state_dict(model.state_dict(), cfg)
    missing, unexpected = bamba.load_state_dict(state, strict=False, assign=True)
    if unexpected or set(missing) - ({"lm_head.weight"} if cfg.tie_embeddings else set()):
        raise RuntimeError(f"Bamba mapping incomplete: missing {missing}, unexpected {unexpected}")
    if cfg.tie_embeddings:
        bamba.tie_weights()
    bamba.model.rotary_emb = type(bamba.model.rotary_emb)(hf_config)  # rebuild meta buffers
    return bamba.eval()


def export_hf(checkpoint: str | Path, output: str | Path, tokenizer_file: str | Path | None = None,
              dtype: str = "float32") -> dict:
    """Write a BambaForCausalLM directory; returns {"output", "max_logit_diff", ...}.

    Written to a sibling temporary directory, checked, then renamed into place. The check
    (fp32 exports) reloads the written directory with `AutoModelForCausalLM.from_pretrained`
    exactly as a user would; other dtypes are checked in memory before the cast. A refused
    or failed export removes its temporary directory."""
    if dtype not in EXPORT_DTYPES:
        raise ValueError(f"dtype={dtype!r}; expected one of {sorted(EXPORT_DTYPES)}")
    from mamba_slm.platform.post.quantize import is_quantized_dir

    if is_quantized_dir(checkpoint):
        raise CheckpointError(f"{checkpoint} is a quantized model (jobs/quantize.py), which Bamba cannot "
                              "hold: export the float model it was made from")
    loaded = load_checkpoint(checkpoint, device="cpu", tokenizer_file=tokenizer_file)
    ours, output = loaded.model, Path(output)
    tmp = output.with_name(output.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        diff = _write_checked(ours, loaded, tmp, output, dtype)
    finally:  # refused or failed: leave no half-written export behind
        shutil.rmtree(tmp, ignore_errors=True)
    return {"output": str(output), "max_logit_diff": diff, "atol": LOGITS_ATOL, "dtype": dtype,
            "attn_layer_indices": ours.config.attn_layer_indices}


def _write_checked(ours: HybridLM, loaded: LoadedModel, tmp: Path, output: Path, dtype: str) -> float:
    """Write the Bamba directory into `tmp`, check its logits, rename it to `output`."""
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    bamba = build_bamba(ours, loaded.eos_id)
    diff = None
    if dtype != "float32":
        diff = _check(max_logit_diff(ours, bamba), output)
    bamba.to(EXPORT_DTYPES[dtype]).save_pretrained(tmp)
    PreTrainedTokenizerFast(tokenizer_object=loaded.tokenizer, eos_token=loaded.eos_token,
                            bos_token=loaded.eos_token, pad_token=loaded.eos_token,
                            model_max_length=ours.config.max_seq_len).save_pretrained(tmp)
    # transformers 5 names its class "TokenizersBackend", unknown to 4.x (which serving
    # stacks such as vLLM may pin); both resolve "PreTrainedTokenizerFast".
    tok_config = tmp / "tokenizer_config.json"
    tok_config.write_text(json.dumps({**json.loads(tok_config.read_text()),
                                      "tokenizer_class": "PreTrainedTokenizerFast"}, indent=2))
    if dtype == "float32":
        diff = _check(max_logit_diff(ours, AutoModelForCausalLM.from_pretrained(tmp).eval()), output)
    if output.exists():
        output.rmdir()  # callers pass a new or empty directory
    tmp.rename(output)
    return diff


def _check(diff: float, output: Path) -> float:
    if diff > LOGITS_ATOL:
        raise RuntimeError(f"exported Bamba logits differ from the model's by {diff:.3g} > {LOGITS_ATOL}; "
                           f"not writing {output}")
    return diff


def read_hf_state_dict(hf_dir: Path) -> dict[str, torch.Tensor]:
    index = hf_dir / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (hf_dir / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"{hf_dir} has no model.safetensors(.index.json): export with safetensors")
    state: dict[str, torch.Tensor] = {}
    for name in files:
        state.update(load_file(str(hf_dir / name)))
    return state


def import_hf(hf_dir: str | Path, output: str | Path) -> Path:
    """A BambaForCausalLM directory -> this project's save_pretrained directory (fp32)."""
    from tokenizers import Tokenizer
    hf_dir = Path(hf_dir)
    config = json.loads((hf_dir / "config.json").read_text())
    if config.get("model_type") != "bamba":
        ours = isinstance(config.get("model"), dict) and "layer_pattern" in config["model"]
        raise UnsupportedConversion(
            f"{hf_dir}/config.json has model_type={config.get('model_type')!r}, expected 'bamba': "
            + ("it is already this project's model directory; use it as it is (export it with "
               "--checkpoint)" if ours else "give a BambaForCausalLM directory (config.json + safetensors)"))
    tok_file = hf_dir / TOKENIZER_FILE
    vocab = Tokenizer.from_file(str(tok_file)).get_vocab_size() if tok_file.is_file() else None
    cfg = from_bamba_config(config, vocab_size=vocab)
    state = {k: v.float() for k, v in from_bamba_state_dict(read_hf_state_dict(hf_dir), cfg).items()}
    with torch.device("meta"):
        model = HybridLM(cfg)
    model.load_state_dict(state, strict=True, assign=True)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    return save_pretrained(model, output, tokenizer_file=tok_file if tok_file.is_file() else None,
                           metadata={"imported_from": str(hf_dir)})
