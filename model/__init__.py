"""The hybrid Mamba-2 / attention language model (the network only).

    from mamba_slm.model import ModelConfig, HybridLM
    model = HybridLM(ModelConfig.from_name("tiny"))
"""
from .config import PRESETS, ModelConfig, derive_layer_pattern
from .hybrid import Block, HybridLM, InferenceCache, LMOutput

__all__ = ["PRESETS", "ModelConfig", "derive_layer_pattern", "Block", "HybridLM", "InferenceCache", "LMOutput"]
