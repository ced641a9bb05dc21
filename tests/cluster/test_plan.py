"""Cost planner: the issue's command, where each number comes from, and bad flags."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from mamba_slm.cluster.cost import load_table, model_cost, parse_count, plan

ISSUE_COMMAND = ["jobs/plan.py", "--size", "6.7B", "--tokens", "100B", "--gpu", "A100-80GB",
                 "--gpus", "16", "--spot"]


def test_issue_command_prints_the_cost_table_and_sources(repo_root):
    done = subprocess.run([sys.executable, *ISSUE_COMMAND], cwd=repo_root, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert out.splitlines()[0] == "| size | tokens | GPUs | hours (on-demand / spot) | on-demand $ | spot $ | savings |"
    row = out.splitlines()[2]
    assert row.startswith("| 6.7B | 100B | 16x A100-80GB |")
    for needle in ("plan (spot):", "GPU-hours", "where the numbers come from:", "estimated: MFU 0.35",
                   "p4de.24xlarge", "Young/Daly", "checkpoint every", "HybridLM on the meta device"):
        assert needle in out


def test_numbers_are_consistent_and_spot_pays_for_its_rework():
    p = plan("6.7B", 100e9, "A100-80GB", 16)
    model = model_cost("6.7B")
    assert p.model == model and p.nodes == 2
    expected_tps = 0.35 * 312e12 / model.flops_per_token
    assert p.throughput.tokens_per_sec_per_gpu == pytest.approx(expected_tps)
    assert p.compute_hours == pytest.approx(100e9 / (expected_tps * 16) / 3600)
    assert p.on_demand_cost == pytest.approx(p.compute_hours * 16 * 3.43)
    assert p.spot_hours == pytest.approx(p.compute_hours * p.cadence.wall_time_factor)
    assert p.spot_hours > p.compute_hours
    assert p.spot_cost == pytest.approx(p.spot_hours * 16 * 3.43 * 0.35)
    assert 0 < p.savings < 0.65
    # A higher preemption rate costs more rework.
    from mamba_slm.cluster.cost import SpotAssumptions
    worse = plan("6.7B", 100e9, "A100-80GB", 16, spot=SpotAssumptions(preemptions_per_node_hour=0.5))
    assert worse.spot_cost > p.spot_cost and worse.on_demand_cost == pytest.approx(p.on_demand_cost)


def test_measured_entry_wins_and_flags_override_prices(tmp_path):
    table = load_table("throughput.json")
    seq = model_cost("1.3B").seq_len
    table["measured"] = [{"size": "1.3B", "gpu": "H100-80GB", "seq_len": seq, "tokens_per_sec_per_gpu": 12345.0,
                          "card": "H100 80GB HBM3", "date": "2026-11-27", "command": "python bench/train.py"}]
    path = tmp_path / "throughput.json"
    path.write_text(json.dumps(table))
    p = plan("1.3B", 1e9, "H100-80GB", 8, throughput_table=path, on_demand_price=2.0, spot_price=1.0)
    assert p.throughput.tokens_per_sec_per_gpu == 12345.0
    assert p.throughput.source.startswith("measured on H100 80GB HBM3 (2026-11-27)")
    assert (p.prices.on_demand, p.prices.spot, p.prices.spot_source) == (2.0, 1.0, "--spot-price")
    assert plan("1.3B", 1e9, "H100-80GB", 8, throughput_table=path, mfu=0.5).throughput.source.startswith("estimated")


def test_every_table_entry_says_where_it_comes_from():
    throughput, prices = load_table("throughput.json"), load_table("gpu_prices.json")
    for card in throughput["gpus"].values():
        assert card["peak_source"] and card["mfu_source"]
    for entry in throughput["measured"]:
        assert {"card", "date", "command"} <= set(entry)
    for entry in prices["gpus"].values():
        assert entry["source"] and entry["date"]
    assert set(throughput["gpus"]) == set(prices["gpus"])


@pytest.mark.parametrize("flags,message", [
    (["--tokens", "lots"], "--tokens 'lots'"),
    (["--gpus", "12"], "--gpus 12 must be a positive multiple of --gpus-per-node 8"),
    (["--mfu", "1.5"], "--mfu 1.5 must be in (0, 1]"),
    (["--spot-price", "-1"], "--spot-price -1.0 must be a finite number > 0"),
    (["--spot-price", "nan"], "--spot-price nan must be a finite number > 0"),  # printed $nan before
    (["--restart-s", "inf"], "--restart-s inf must be a finite number >= 0"),
    (["--gpu", "V100"], "invalid choice: 'V100'"),
])
def test_bad_arguments_exit_2_with_a_clear_message(flags, message, capsys):
    sys.path.insert(0, "jobs")
    try:
        import plan as plan_job
    finally:
        sys.path.remove("jobs")
    base = dict(zip(ISSUE_COMMAND[1::2], ISSUE_COMMAND[2::2]))
    base.pop("--spot", None)
    for flag, value in zip(flags[::2], flags[1::2]):
        base[flag] = value
    with pytest.raises(SystemExit) as exit_info:
        plan_job.main([x for kv in base.items() for x in kv])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_parse_count():
    assert parse_count("100B") == 1e11 and parse_count("2.5T") == 2.5e12 and parse_count("3e5") == 3e5
    with pytest.raises(ValueError):
        parse_count("-1B")
