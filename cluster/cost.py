"""Cost planner: GPU-hours, wall time and dollars for a pretraining run, on-demand
versus spot, with the expected rework from preemptions.

Numbers and where they come from:
- throughput: `data/throughput.json`, a measured entry for (size, GPU, sequence length)
  if a benchmark left one, else an estimate: assumed MFU x datasheet peak / FLOPs per
  token, FLOPs from `mamba_slm.model` (`HybridLM.flops_per_token`, built on the meta
  device so nothing is allocated). Scaling over GPUs is taken as linear.
- prices: `data/gpu_prices.json` (dated, with sources), or the user's flags.
- spot overhead: Young/Daly checkpoint cadence (`mamba_slm.platform.cadence`) from the
  checkpoint write time and the preemption rate; the wall time grows by the time spent
  writing checkpoints, redoing lost work and restarting, and spot GPU-hours with it.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from mamba_slm.platform.cadence import CheckpointCadence, job_mtbf_s, plan_cadence

DATA_DIR = Path(__file__).parent / "data"
# DeepSpeed checkpoint bytes per parameter: bf16 weights (2) + fp32 master weights,
# Adam m and v (12).
CHECKPOINT_BYTES_PER_PARAM = 14


@dataclass(frozen=True)
class ModelCost:
    parameters: int
    flops_per_token: float
    seq_len: int


def model_cost(size: str, seq_len: int | None = None) -> ModelCost:
    """Parameter count and FLOPs per token of a preset, from the model itself."""
    import torch

    from mamba_slm.model import HybridLM, ModelConfig

    cfg = ModelConfig.from_name(size)
    seq_len = seq_len or cfg.max_seq_len
    with torch.device("meta"):
        model = HybridLM(cfg)
    return ModelCost(model.num_parameters(), float(model.flops_per_token(seq_len)), seq_len)


@dataclass(frozen=True)
class Throughput:
    tokens_per_sec_per_gpu: float
    source: str


def lookup_throughput(table: dict, size: str, gpu: str, model: ModelCost,
                      mfu: float | None = None) -> Throughput:
    """A measured entry if there is one (and no --mfu override), else the estimate."""
    if mfu is None:
        for entry in table.get("measured", []):
            if (entry["size"], entry["gpu"], entry["seq_len"]) == (size, gpu, model.seq_len):
                return Throughput(entry["tokens_per_sec_per_gpu"],
                                  f"measured on {entry['card']} ({entry['date']}): {entry['command']}")
    card = table["gpus"][gpu]
    used_mfu = card["assumed_mfu"] if mfu is None else mfu
    per_gpu = used_mfu * card["peak_bf16_tflops"] * 1e12 / model.flops_per_token
    why = card["mfu_source"] if mfu is None else "given by --mfu"
    return Throughput(per_gpu, f"estimated: MFU {used_mfu:.2f} [{why}] x {card['peak_bf16_tflops']} "
                               f"TFLOP/s ({card['peak_source']}) / {model.flops_per_token:.3g} "
                               f"FLOPs per token (6N + attention, seq {model.seq_len})")


@dataclass(frozen=True)
class Prices:
    on_demand: float
    spot: float
    on_demand_source: str
    spot_source: str


def lookup_prices(table: dict, gpu: str, on_demand: float | None = None,
                  spot: float | None = None) -> Prices:
    entry = table["gpus"][gpu]
    od = entry["on_demand"] if on_demand is None else on_demand
    od_source = f"{entry['source']} (as of {entry['date']})" if on_demand is None else "--on-demand-price"
    if spot is not None:
        return Prices(od, spot, od_source, "--spot-price")
    fraction = entry.get("spot_fraction", table["spot_fraction"])
    return Prices(od, od * fraction, od_source,
                  f"{fraction:.0%} of on-demand ({table['spot_fraction_source']})")


@dataclass(frozen=True)
class SpotAssumptions:
    preemptions_per_node_hour: float = 0.05   # one reclaim per node per 20 h: assumption
    checkpoint_write_s: float | None = None   # measured write time; None: estimate
    write_gbps_per_node: float = 1.0          # to object storage, GB/s per node: assumption
    restart_s: float = 600.0                  # new node + pods + load checkpoint: assumption


@dataclass(frozen=True)
class CostPlan:
    size: str
    tokens: float
    gpu: str
    gpus: int
    nodes: int
    model: ModelCost
    throughput: Throughput
    prices: Prices
    cadence: CheckpointCadence
    checkpoint_write_source: str

    @property
    def compute_hours(self) -> float:
        """Wall hours without interruptions (on-demand)."""
        return self.tokens / (self.throughput.tokens_per_sec_per_gpu * self.gpus) / 3600

    @property
    def spot_hours(self) -> float:
        return self.compute_hours * self.cadence.wall_time_factor

    @property
    def on_demand_cost(self) -> float:
        return self.compute_hours * self.gpus * self.prices.on_demand

    @property
    def spot_cost(self) -> float:
        return self.spot_hours * self.gpus * self.prices.spot

    @property
    def savings(self) -> float:
        return 1.0 - self.spot_cost / self.on_demand_cost


def load_table(name: str, path: Path | None = None) -> dict:
    return json.loads((path or DATA_DIR / name).read_text())


def plan(size: str, tokens: float, gpu: str, gpus: int, gpus_per_node: int = 8, *,
         seq_len: int | None = None, mfu: float | None = None,
         on_demand_price: float | None = None, spot_price: float | None = None,
         spot: SpotAssumptions = SpotAssumptions(), throughput_table: Path | None = None,
         prices_table: Path | None = None) -> CostPlan:
    model = model_cost(size, seq_len)
    throughput = lookup_throughput(load_table("throughput.json", throughput_table), size, gpu, model, mfu)
    prices = lookup_prices(load_table("gpu_prices.json", prices_table), gpu, on_demand_price, spot_price)
    nodes = math.ceil(gpus / gpus_per_node)
    if spot.checkpoint_write_s is None:
        # ZeRO shards the checkpoint: every node writes its part in parallel.
        write_s = model.parameters * CHECKPOINT_BYTES_PER_PARAM / (nodes * spot.write_gbps_per_node * 1e9)
        write_source = (f"estimated: {model.parameters / 1e9:.2f}B params x {CHECKPOINT_BYTES_PER_PARAM} B "
                        f"/ ({nodes} nodes x {spot.write_gbps_per_node:g} GB/s)")
    else:
        write_s, write_source = spot.checkpoint_write_s, "given by --checkpoint-write-s"
    cadence = plan_cadence(write_s, job_mtbf_s(spot.preemptions_per_node_hour, nodes), spot.restart_s)
    return CostPlan(size, tokens, gpu, gpus, nodes, model, throughput, prices, cadence, write_source)


def parse_count(text: str) -> float:
    """'100B' -> 1e11; accepts K, M, B (or G), T suffixes and plain numbers."""
    scale = {"K": 1e3, "M": 1e6, "B": 1e9, "G": 1e9, "T": 1e12}
    text = text.strip().upper()
    factor = scale.get(text[-1:], 1.0)
    number = text[:-1] if text[-1:] in scale else text
    value = float(number) * factor  # ValueError names the bad text
    if not value > 0 or math.isinf(value):
        raise ValueError(f"{text!r} must be a positive count")
    return value


def format_plan(p: CostPlan, highlight_spot: bool) -> str:
    tokens = f"{p.tokens / 1e9:g}B"
    rows = [
        "| size | tokens | GPUs | hours (on-demand / spot) | on-demand $ | spot $ | savings |",
        "|---|---|---|---|---|---|---|",
        f"| {p.size} | {tokens} | {p.gpus}x {p.gpu} | {p.compute_hours:,.0f} on-demand / "
        f"{p.spot_hours:,.0f} spot | ${p.on_demand_cost:,.0f} | ${p.spot_cost:,.0f} | {p.savings:.0%} |",
    ]
    chosen = "spot" if highlight_spot else "on-demand"
    hours = p.spot_hours if highlight_spot else p.compute_hours
    cost = p.spot_cost if highlight_spot else p.on_demand_cost
    lines = rows + [
        "",
        f"plan ({chosen}): {hours * p.gpus:,.0f} GPU-hours, wall {hours:,.1f} h "
        f"({hours / 24:,.1f} days), ${cost:,.0f}",
        f"on-demand: {p.compute_hours * p.gpus:,.0f} GPU-hours, {p.compute_hours:,.1f} h, "
        f"${p.on_demand_cost:,.0f} at ${p.prices.on_demand:.2f}/GPU-h",
        f"spot:      {p.spot_hours * p.gpus:,.0f} GPU-hours, {p.spot_hours:,.1f} h, "
        f"${p.spot_cost:,.0f} at ${p.prices.spot:.2f}/GPU-h, incl. {p.cadence.waste_fraction:.1%} "
        "preemption overhead",
        "",
        "where the numbers come from:",
        f"  model: {p.model.parameters / 1e9:.2f}B parameters, {p.model.flops_per_token:.3g} FLOPs/token "
        f"at seq {p.model.seq_len} (mamba_slm.model.HybridLM on the meta device)",
        f"  throughput: {p.throughput.tokens_per_sec_per_gpu:,.0f} tokens/s per GPU, "
        f"{p.throughput.tokens_per_sec_per_gpu * p.gpus:,.0f} on {p.gpus} GPUs (linear scaling assumed); "
        f"{p.throughput.source}",
        f"  on-demand price: {p.prices.on_demand_source}",
        f"  spot price: {p.prices.spot_source}",
        f"  spot overhead (Young/Daly): {p.cadence.describe()}; restart {p.cadence.restart_s:.0f} s; "
        f"checkpoint write {p.checkpoint_write_source}",
    ]
    return "\n".join(lines)
