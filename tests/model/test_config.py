import pytest
import torch

from mamba_slm.model import HybridLM, ModelConfig, derive_layer_pattern
from mamba_slm.model.config import PRESETS, SEED_PARAMS


@pytest.mark.parametrize("name", ["1.3B", "2.7B", "6.7B", "13B"])
def test_seed_sizes_within_5_percent_on_meta(name):
    cfg = ModelConfig.from_name(name)
    with torch.device("meta"):
        model = HybridLM(cfg)
    assert cfg.max_seq_len == 8192
    assert abs(model.num_parameters() / SEED_PARAMS[name] - 1) < 0.05


@pytest.mark.parametrize("name,low,high", [("proxy-10M", 7e6, 13e6), ("proxy-50M", 40e6, 60e6),
                                           ("proxy-150M", 120e6, 180e6), ("tiny", 1e5, 2e6)])
def test_small_presets(name, low, high):
    with torch.device("meta"):
        n = HybridLM(ModelConfig.from_name(name)).num_parameters()
    assert low < n < high


def test_strategic_placement_of_1_3b():
    pattern = ModelConfig.from_name("1.3B").layer_pattern
    assert pattern.startswith("A") and pattern.endswith("AA")
    assert pattern.count("A") == 6 and len(pattern) == 24
    middle = [i for i, c in enumerate(pattern[1:-2], start=1) if c == "A"]
    gaps = [b - a for a, b in zip([0] + middle, middle + [22])]
    assert max(gaps) - min(gaps) <= 2  # evenly spread


@pytest.mark.parametrize("placement", ["strategic", "uniform", "front", "back"])
@pytest.mark.parametrize("ratio", [0.0, 0.1, 0.25, 0.5])
def test_derived_patterns_have_the_asked_ratio(placement, ratio):
    pattern = derive_layer_pattern(24, ratio, placement)
    assert len(pattern) == 24
    assert pattern.count("A") == round(24 * ratio)


def test_front_and_back_loading():
    front, back = derive_layer_pattern(24, 0.25, "front"), derive_layer_pattern(24, 0.25, "back")
    assert "A" not in front[12:] and "A" not in back[:12]


def test_verbatim_pattern_and_overrides():
    cfg = ModelConfig.from_name("tiny", layer_pattern="amma")
    assert cfg.layer_pattern == "AMMA" and cfg.attn_layer_indices == [0, 3]
    assert ModelConfig.from_name("1.3B", attn_ratio=0.125).layer_pattern.count("A") == 3
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("kwargs,field", [
    (dict(layer_pattern="AMX M"), "layer_pattern"),
    (dict(layer_pattern="AMM"), "layer_pattern"),
    (dict(attn_placement="middle"), "attn_placement"),
    (dict(attn_ratio=1.5), "attn_ratio"),
    (dict(ssm_path="triton"), "ssm_path"),
    (dict(n_kv_heads=3), "n_kv_heads"),
    (dict(mamba_head_dim=48), "mamba_head_dim"),
    (dict(hidden_size=0), "hidden_size"),
    (dict(mamba_d_conv=1), "mamba_d_conv"),  # trained, then the decode cache failed
    (dict(norm_eps=-1.0), "norm_eps"),
    (dict(init_std=float("nan")), "init_std"),
    (dict(tie_embeddings="false"), "tie_embeddings"),  # a truthy string tied the weights
    (dict(rope_scaling={"type": "linear"}), "'factor' must be"),  # factor 1: no scaling at all
    (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "not transformers' 'rope_type'"),
    (dict(rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256}),
     "'original_max_position_embeddings' is 'original_max_seq_len' here"),
    (dict(rope_scaling={"type": "yarn", "factor": 4.0, "beta_fast": 1, "beta_slow": 1}), "beta_fast > beta_slow"),
    (dict(rope_scaling={"type": "ntk", "factor": 2.0}, rotary_fraction=0.125), "NTK scaling needs"),
    (dict(rope_scaling={"type": "linear", "factor": 0.5}), "'factor' must be"),
])
def test_invalid_configs_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        ModelConfig.from_name("tiny", **kwargs)


def test_unknown_preset_lists_choices():
    with pytest.raises(ValueError, match="tiny"):
        ModelConfig.from_name("7B")


def test_padded_vocab():
    assert ModelConfig.from_name("tiny", vocab_size=5000).padded_vocab_size == 5056
    assert set(PRESETS) >= {"1.3B", "2.7B", "6.7B", "13B", "tiny"}


def test_size_table_command(capsys):
    from mamba_slm.model.__main__ import main
    assert main(["--sizes", "1.3B", "tiny"]) == 0
    out = capsys.readouterr().out
    assert ModelConfig.from_name("1.3B").layer_pattern in out and "1.45B" in out
