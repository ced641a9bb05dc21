"""Evaluation: held-out perplexity on curated data (cheap, usable inside training), the
lm-eval model "mamba-slm" and the benchmark suite, and export to transformers' Bamba.

    from mamba_slm.platform.evaluate import perplexity, load_checkpoint
    perplexity(model, "data/demo", split="val", max_batches=20)  # {"loss", "ppl", "tokens", "rows"}

lm-eval and transformers are imported only by the submodules that need them
(`lm`, `benchmarks`, `hf`), so a training loop importing `perplexity` stays light.
"""
from .checkpoint import CheckpointError, LoadedModel, load_checkpoint
from .perplexity import perplexity

__all__ = ["CheckpointError", "LoadedModel", "load_checkpoint", "perplexity"]
