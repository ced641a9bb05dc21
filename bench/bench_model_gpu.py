"""Single-GPU model benchmarks: training tokens/s, MFU and peak memory (decode speed:
bench/bench_decode_gpu.py, which builds its mamba-ssm side with `build` from here).

Builds every side on the same card in one process and prints one table:
  ours       this project's HybridLM (kernel path: mamba-ssm Triton SSD, SDPA/flash attention)
  mamba_ssm  mamba-ssm's reference hybrid (MambaLMHeadModel, Mamba2 + MHA layers at the
             same indices, GatedMLP in every layer), same widths
  attention  this project's all-attention configuration with the same parameter count
  ours_fp8, attention_fp8   the same with the blocks' matmuls in float8 (torchao tensorwise,
             as `jobs/pretrain.py --float8`; the FLOP count and the ceiling stay bf16's)

FLOPs per token = 6 N + 12 * attention layers * hidden * seq (the convention of issue 10);
MFU is against the bf16 matmul ceiling measured in the same run (8192^3 products).

    python bench/bench_model_gpu.py train --size 1.3B --seqs 2048 8192 --sides ours mamba_ssm attention
Results as JSON lines go to --out (default: stdout only).
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch
import torch.nn.functional as F

from mamba_slm.model import HybridLM, ModelConfig, layers


def matmul_ceiling_tflops(n: int = 8192, iters: int = 10) -> float:
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        a @ b
    torch.cuda.synchronize()
    return 2 * n ** 3 * iters / (time.perf_counter() - t0) / 1e12


def equal_param_attention_config(cfg: ModelConfig) -> ModelConfig:
    """All-attention stack with the hybrid's depth and width; the MLP is widened (in steps
    of 256) until the parameter count matches the hybrid's."""
    with torch.device("meta"):
        target = HybridLM(cfg).num_parameters()
    best = None
    for mlp in range(cfg.mlp_hidden_size, 8 * cfg.mlp_hidden_size, 256):
        c = ModelConfig.from_dict({**cfg.to_dict(), "layer_pattern": "A" * cfg.n_layers,
                                   "mlp_hidden_size": mlp, "name": cfg.name + "-attention"})
        with torch.device("meta"):
            n = HybridLM(c).num_parameters()
        if best is None or abs(n - target) < abs(best[0] - target):
            best = (n, c)
        if n > target:
            break
    return best[1]


def build(side: str, cfg: ModelConfig):
    """-> (model, loss(ids (B, T+1)) -> scalar, n_params, n_attention_layers).
    Ours computes the loss the way training does (chunked cross-entropy); mamba-ssm's
    model returns logits and the loss is taken on them. A side ending in `_fp8` is that
    side with its blocks' matmuls in float8 (`--float8` of training)."""
    if side.endswith("_fp8"):
        from mamba_slm.platform.train.float8 import apply_float8
        model, loss, n_params, n_attn = build(side[:-len("_fp8")], cfg)
        apply_float8(model)
        return model, loss, n_params, n_attn
    if side in ("ours", "ours_plain", "attention"):
        if side == "attention":
            cfg = equal_param_attention_config(cfg)
        model = HybridLM(cfg)
        loss = lambda ids: model(ids[:, :-1], labels=ids[:, 1:], return_logits=False).loss
        if side == "ours_plain":
            # Ours without the training levers of 2026-11-27 (session 3), for a side-by-side
            # ratio: the loss through a plain linear's forward per chunk, recomputed in
            # backward (the path of a swapped head), and no torch.compile of the SwiGLU
            # activation and RoPE. Fused add+norm has no switch.
            model.lm_head.__class__ = torch.nn.Linear
            def loss(ids, inner=loss):
                layers.COMPILE_ON_GPU = False
                try:
                    return inner(ids)
                finally:
                    layers.COMPILE_ON_GPU = True
    elif side == "mamba_ssm":
        from mamba_ssm.models.config_mamba import MambaConfig
        from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel
        mc = MambaConfig(
            d_model=cfg.hidden_size, d_intermediate=cfg.mlp_hidden_size, n_layer=cfg.n_layers,
            vocab_size=cfg.vocab_size, pad_vocab_size_multiple=cfg.pad_vocab_multiple,
            ssm_cfg={"layer": "Mamba2", "d_state": cfg.mamba_d_state, "headdim": cfg.mamba_head_dim,
                     "chunk_size": cfg.mamba_chunk_size},
            attn_layer_idx=cfg.attn_layer_indices,
            # rotary in mamba-ssm's MHA needs flash-attn; without it the layer runs SDPA, no RoPE
            attn_cfg={"num_heads": cfg.n_heads, "num_heads_kv": cfg.n_kv_heads, "causal": True},
            rms_norm=True, residual_in_fp32=True, fused_add_norm=True, tie_embeddings=cfg.tie_embeddings)
        model = MambaLMHeadModel(mc)
        loss = lambda ids: F.cross_entropy(model(ids[:, :-1]).logits[..., :cfg.vocab_size].float().flatten(0, 1),
                                           ids[:, 1:].flatten())
    else:
        raise ValueError(side)
    n_attn = cfg.layer_pattern.count("A")  # the attention side's cfg is all "A"
    return model.cuda(), loss, sum(p.numel() for p in model.parameters()), n_attn


def kernel_profile(fn, calls: int = 1, rows: int = 25) -> tuple[str, float]:
    """torch.profiler over `calls` calls of fn() -> (its CUDA kernels by total time as a
    table, kernels launched per call)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    events = prof.key_averages()
    launches = sum(e.count for e in events if e.device_type.name == "CUDA") / calls
    return events.table(sort_by="cuda_time_total", row_limit=rows, max_name_column_width=80), launches


def bench_train(side, cfg, seq, tokens_per_step, steps, warmup, ceiling, checkpointing=False, profile_to=None):
    torch.manual_seed(0)
    torch.cuda.reset_peak_memory_stats()
    model, loss_fn, n_params, n_attn = build(side, cfg)
    if checkpointing and hasattr(model, "set_gradient_checkpointing"):
        model.set_gradient_checkpointing(True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    batch = max(1, tokens_per_step // seq)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq + 1), device="cuda")

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = loss_fn(ids)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = step()
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / steps
    tok_s = batch * seq / dt
    if profile_to:
        with open(profile_to, "w") as f:
            f.write(f"{side}, seq {seq}, one training step\n{kernel_profile(step)[0]}\n")
    flops_tok = 6 * n_params + 12 * n_attn * cfg.hidden_size * seq
    row = dict(kind="train", side=side, size=cfg.name, seq=seq, batch=batch, params=n_params,
               tokens_per_s=round(tok_s), step_ms=round(dt * 1e3, 1),
               tflops=round(tok_s * flops_tok / 1e12, 1), mfu_vs_ceiling=round(tok_s * flops_tok / 1e12 / ceiling, 3),
               peak_gib=round(torch.cuda.max_memory_allocated() / 2 ** 30, 1), loss=round(loss.item(), 3),
               checkpointing=checkpointing)
    del model, opt
    torch.cuda.empty_cache()
    return row


def print_table(rows):
    if not rows:
        return
    keys = list(rows[0])
    widths = {k: max(len(k), *(len(str(r.get(k, ""))) for r in rows)) for k in keys}
    print(" | ".join(k.ljust(widths[k]) for k in keys))
    print("-|-".join("-" * widths[k] for k in keys))
    for r in rows:
        print(" | ".join(str(r.get(k, "")).ljust(widths[k]) for k in keys))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["train"])
    p.add_argument("--size", default="1.3B")
    p.add_argument("--sides", nargs="+", default=["ours", "mamba_ssm", "attention"],
                   choices=["ours", "ours_plain", "mamba_ssm", "attention", "ours_fp8", "attention_fp8"])
    p.add_argument("--seqs", nargs="+", type=int, default=[2048, 8192])
    p.add_argument("--tokens", type=int, default=16384, help="tokens per training step")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--checkpointing", action="store_true", help="activation checkpointing (ours only)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="a ModelConfig field for every side, e.g. --set mamba_chunk_size=128 (repeatable)")
    p.add_argument("--out", default=None, help="append JSON lines here")
    p.add_argument("--profile-dir", default=None,
                   help="write torch.profiler's top kernels of one step per side and length here")
    args = p.parse_args(argv)
    overrides = {}
    for item in args.set:
        field, sep, value = item.partition("=")
        if not sep:
            p.error(f"--set {item!r}: expected FIELD=VALUE, e.g. mamba_chunk_size=128")
        try:
            overrides[field] = json.loads(value)
        except json.JSONDecodeError:
            overrides[field] = value  # a plain string
    try:
        ModelConfig.from_name(args.size, **overrides)
    except (TypeError, ValueError) as exc:
        p.error(f"--set: {exc}")
    if not torch.cuda.is_available():
        p.error("needs a CUDA GPU")
    dev = torch.cuda.get_device_name()
    print(f"device: {dev}, torch {torch.__version__}", flush=True)
    rows = []
    ceiling = matmul_ceiling_tflops()
    print(f"measured bf16 matmul ceiling: {ceiling:.0f} TFLOP/s", flush=True)
    for seq in args.seqs:
        cfg = ModelConfig.from_name(args.size, **{"max_seq_len": max(seq, 8192), **overrides})
        for side in args.sides:
            try:
                profile_to = args.profile_dir and f"{args.profile_dir}/train_{side}_{seq}.txt"
                row = bench_train(side, cfg, seq, args.tokens, args.steps, args.warmup, ceiling,
                                  args.checkpointing and side != "mamba_ssm", profile_to)
            except torch.OutOfMemoryError:
                row = dict(kind="train", side=side, size=args.size, seq=seq, tokens_per_s="OOM")
                torch.cuda.empty_cache()
            row.update(device=dev, ceiling_tflops=round(ceiling), **({"set": " ".join(args.set)} if args.set else {}))
            rows.append(row)
            print(json.dumps(row), flush=True)
    print_table(rows)
    if args.out:
        with open(args.out, "a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
