"""Unit tests of the sweep's pieces that need no cluster: the search space, rungs,
staged schedules, the layout carried to a target depth, and the CLIs' argument errors."""
from __future__ import annotations

import importlib.util
import json

import pytest

from mamba_slm.model import ModelConfig
from mamba_slm.platform.train.schedule import lr_at
from mamba_slm.tune.config import SweepConfig
from mamba_slm.tune.layout import apply_layout, layout_overrides
from mamba_slm.tune.results import LAYOUT_FORMAT
from mamba_slm.tune.space import SearchSpace, TrialSettings, parse_choices
from mamba_slm.tune.trial import trial_configs


def _sweep(tmp_path, **kw):
    return SweepConfig(name="s", output_dir=str(tmp_path), data_path="/data", proxy="tiny", **kw)


def test_space_is_typed_and_checked():
    space = SearchSpace(patterns=["ammA"], model_choices=parse_choices(["mamba_d_state=16,32"]),
                        training_choices=parse_choices(["weight_decay=0,0.1", "schedule=cosine,wsd"]))
    assert space.patterns == ["AMMA"] and space.model_choices == {"mamba_d_state": [16, 32]}
    assert space.training_choices == {"weight_decay": [0.0, 0.1], "schedule": ["cosine", "wsd"]}
    assert space.layouts == ["strategic", "uniform", "front", "back", "AMMA"]
    space.check_depth(4)
    with pytest.raises(ValueError, match="one letter per layer"):
        space.check_depth(12)
    with pytest.raises(ValueError, match="no field 'd_state'"):
        SearchSpace(model_choices={"d_state": ["16"]})
    with pytest.raises(ValueError, match="set by the sweep itself"):
        SearchSpace(training_choices={"lr": ["0.1"]})
    with pytest.raises(ValueError, match="not a valid int"):
        SearchSpace(model_choices={"mamba_d_state": ["big"]})
    with pytest.raises(ValueError, match="placements"):
        SearchSpace(placements=["middle"])
    with pytest.raises(ValueError, match="FIELD=V1"):
        parse_choices(["mamba_d_state"])


def test_a_trial_trains_in_stages_on_one_schedule(tmp_path):
    cfg = _sweep(tmp_path, steps=10, rungs=4)
    assert cfg.rung_steps() == [2, 5, 8, 10]
    settings = TrialSettings.from_config({"layout": "uniform", "attn_ratio": 0.5, "lr": 1e-3,
                                          "warmup_fraction": 0.2, "model.mamba_d_state": 32})
    assert settings.model_overrides() == {"mamba_d_state": 32, "attn_ratio": 0.5, "attn_placement": "uniform"}
    stage, _, run = trial_configs(cfg, settings, "t1", steps=5)
    full, _, _ = trial_configs(_sweep(tmp_path, steps=10, rungs=1), settings, "t1", steps=10)
    assert stage.max_steps == 5 and stage.schedule_steps == 10 and stage.warmup_steps == 2
    assert [lr_at(s, stage) for s in range(5)] == [lr_at(s, full) for s in range(5)]
    assert run.name == "t1" and run.output_dir == str(tmp_path / "trials" / "t1") and run.num_workers == 0
    verbatim = TrialSettings.from_config({"layout": "MMAM", "attn_ratio": 0.1, "lr": 1e-3, "warmup_fraction": 0.0})
    assert verbatim.model_overrides() == {"layer_pattern": "MMAM"} and verbatim.attn_ratio is None


def _layout(pattern, placement, ratio, **extra):
    return {"format": LAYOUT_FORMAT, "sweep": "s", "proxy": "tiny", "layer_pattern": pattern,
            "n_layers": len(pattern), "attn_placement": placement, "attn_ratio": ratio,
            "val_loss": 1.0, "model_overrides": {}, **extra}


def test_layout_carries_verbatim_at_equal_depth_and_as_a_rule_otherwise(tmp_path):
    rule = _layout("MMMMMMMAMAMA", "back", 0.25)
    assert layout_overrides(rule, 12, log=lambda *_: None) == {"layer_pattern": "MMMMMMMAMAMA"}
    deeper = layout_overrides(rule, 24, log=lambda *_: None)
    assert deeper == {"attn_ratio": 0.25, "attn_placement": "back"}
    assert ModelConfig.from_name("1.3B", **deeper).layer_pattern.count("A") == 6
    fb = {"layer_pattern": "AMMMMMAMMMMA", "attn_placement": "strategic", "attn_ratio": 0.25, "val_loss": 1.1}
    verbatim = _layout("MAMMMMMMAMMA", None, 0.25, rule_fallback=fb)
    assert layout_overrides(verbatim, 24, log=lambda *_: None) == {"attn_ratio": 0.25, "attn_placement": "strategic"}
    with pytest.raises(ValueError, match="verbatim"):
        layout_overrides(_layout("MAMMMMMMAMMA", None, 0.25), 24, log=lambda *_: None)
    # apply_layout reads a sweep directory and also carries other swept model fields.
    (tmp_path / "best_layout.json").write_text(json.dumps({**rule, "model_overrides": {"mamba_d_state": 32}}))
    assert apply_layout({}, tmp_path, "1.3B", log=lambda *_: None) == {
        "mamba_d_state": 32, "attn_ratio": 0.25, "attn_placement": "back"}


def _job(repo_root, name):
    spec = importlib.util.spec_from_file_location(f"job_{name}", repo_root / "jobs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_bad_arguments_exit_2_with_a_message(repo_root, tmp_path, capsys):
    sweep, pretrain = _job(repo_root, "tune_sweep"), _job(repo_root, "pretrain")
    (tmp_path / "manifest.json").write_text("{}")  # gets the pattern case past the data check
    cases = [(sweep, ["--proxy", "7B", "--data-path", str(tmp_path)], "--proxy '7B'"),
             (sweep, ["--proxy", "tiny", "--data-path", str(tmp_path / "nowhere")], "no manifest.json"),
             (sweep, ["--resume", "--output-dir", str(tmp_path)], "not a sweep directory"),
             (sweep, ["--proxy", "tiny", "--patterns", "AMMMAMMM", "--data-path", str(tmp_path)],
              "one letter per layer"),
             (pretrain, ["--layout-from", str(tmp_path)], "no best_layout.json")]
    for main, argv, message in cases:
        assert main(argv) == 2, argv
        assert message in capsys.readouterr().err, argv
