"""Batch-1 decode on one GPU: this project's model, eager and CUDA graphs, beside mamba-ssm's
reference hybrid of the same shape with its CUDA-graph decoder, in one process.

    python bench/bench_decode_gpu.py --size 1.3B --prompt 128 --new 256 [--profile] [--breakdown] [--out rows.jsonl]

Every side: random weights in bf16, a random 128-token prompt, greedy decoding; the timed
call is the second one (the first captures graphs and runs Triton's autotuning), and covers
prefill plus `--new` tokens, as mamba-ssm's own `generate` timing does (tokens_per_s). For
our graph sides, step_ms / decode_tokens_per_s time the captured step alone, replayed after
the prompt: decoding without the prompt's share. Checks first: our
graph decode must give the same greedy tokens as our eager decode.

The ceiling is the bytes one step must read (every weight once, except the embedding
table, of which one row is read) over the device-to-device copy bandwidth measured here.
`--profile` adds where a step's time goes: each part captured as its own graph and
replayed, and the top kernels of torch.profiler over replayed steps.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import sys
import time

import torch

from bench_model_gpu import build, kernel_profile, print_table
from mamba_slm.model import ModelConfig
from mamba_slm.model import generation
from mamba_slm.model.layers import allow_recompiles
from mamba_slm.platform.post.quantize import QuantConfig, quantize_model, weights_nbytes


def copy_bandwidth_tbs(gib: int = 2, iters: int = 20) -> float:
    """Device-to-device copy, bytes read + written per second (TB/s)."""
    a = torch.empty(gib << 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    b.copy_(a)
    return 2 * a.numel() * iters / time_cuda(lambda: b.copy_(a), iters) / 1e12


def time_cuda(fn, iters: int) -> float:
    """Seconds for `iters` calls, timed with CUDA events after one warm call."""
    fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3


def timed(run) -> tuple[float, float, torch.Tensor]:
    """-> (seconds of the first call, seconds of the second, output of the second)."""
    t0 = time.perf_counter()
    run()
    torch.cuda.synchronize()
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = run()
    torch.cuda.synchronize()
    return first, time.perf_counter() - t0, out


def set_decode_levers(model, on: bool) -> None:
    """Off: the decode step as it was before the levers of 2026-11-27 (session 3): no packed
    q|k|v / gate|up matmuls, RoPE and cache writes in PyTorch instead of the Triton kernel.
    (Fused add+norm has no switch: it is the model's forward.)"""
    from mamba_slm.model.attention import Attention
    for m in model.modules():
        if isinstance(m, Attention):
            m.use_kernel = on
    for group in model.packed_groups():
        if not on and group.weight is not None:
            for name in group.names:  # own storage again: the packing lapses
                lin = getattr(group.owner, name)
                lin.weight.data = lin.weight.data.clone()
    if on:
        model.__dict__.pop("pack_for_decoding", None)
    else:
        model.pack_for_decoding = lambda: None
    generation._GRAPH_DECODERS.pop(model, None)


def inductor_gemv():
    """Experiment: a one-row F.linear compiled by inductor with coordinate-descent tuning,
    which lowers it to a reduction kernel instead of a cuBLAS GEMV (torch/_inductor/
    decomposition.py, `mm`: "our matrix vector multiplies only achieve peak bandwidth with
    coordinate descent tuning"; gpt-fast decodes this way). One compile per weight shape."""
    allow_recompiles(64)
    # x @ w.T, not F.linear: `gemv_linears` replaces F.linear with a call of this function
    return torch.compile(lambda x, w: x @ w.t(), dynamic=False,
                         options={"coordinate_descent_tuning": True})


@contextlib.contextmanager
def gemv_linears(model):
    """Every bias-free one-row linear without autograd on a GPU (all of a batch-1 decode
    step: the model's nn.Linear modules and its packed matmuls call F.linear) through
    `inductor_gemv` while inside; `model`'s cached CUDA graphs are dropped on the way in
    and out, so that each side captures its own matmuls."""
    gemv, plain = inductor_gemv(), torch.nn.functional.linear
    generation._GRAPH_DECODERS.pop(model, None)

    def linear(x, weight, bias=None):
        if bias is None and x.is_cuda and x.numel() == x.shape[-1] and not torch.is_grad_enabled():
            return gemv(x.reshape(1, -1), weight).view(*x.shape[:-1], weight.shape[0])
        return plain(x, weight, bias)

    torch.nn.functional.linear = linear
    try:
        yield
    finally:
        torch.nn.functional.linear = plain
        generation._GRAPH_DECODERS.pop(model, None)


def gemv_rows(model, bandwidth: float, iters: int = 200) -> list[dict]:
    """Each distinct weight shape of a batch-1 decode step (packed ones included): cuBLAS's
    F.linear vs `inductor_gemv`, as the share of the copy bandwidth each reaches."""
    shapes = {tuple(m.weight.shape) for m in model.modules() if isinstance(m, torch.nn.Linear)}
    shapes |= {tuple(g.weight.shape) for g in model.packed_groups() if g.weight is not None}
    gemv, rows = inductor_gemv(), []
    for n, k in sorted(shapes):
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        err = (gemv(x, w).float() - torch.nn.functional.linear(x, w).float()).abs().max().item()
        row = dict(shape=f"{n}x{k}", max_abs_diff=round(err, 4))
        for label, fn in (("cublas", torch.nn.functional.linear), ("inductor", gemv)):
            us = 1e3 * graph_ms(lambda: fn(x, w), iters)
            row[f"{label}_us"] = round(us, 1)
            row[f"{label}_bw"] = round(2 * n * k / (us * 1e-6) / (bandwidth * 1e12), 2)
        rows.append(row)
    return rows


@torch.no_grad()
def decode_rows(cfg: ModelConfig, prompt_len: int, new: int, sides: list[str]):
    """-> (rows, our model, greedy tokens per side, the prompt)."""
    torch.manual_seed(0)
    prompt = torch.randint(0, cfg.vocab_size, (1, prompt_len), device="cuda")
    rows, outs, models = [], {}, {}
    for side in sides:
        family = {"mamba_ssm_graphs": "mamba_ssm", "ours_graphs_int8": "ours_int8"}.get(side, "ours")
        for need in ("ours", family) if family == "ours_int8" else (family,):
            if need in models:
                continue
            if need == "ours_int8":  # the same weights as "ours", INT8 weight-only
                models[need] = quantize_model(copy.deepcopy(models["ours"]), QuantConfig(bits=8))
            else:
                torch.manual_seed(0)
                models[need] = build(need, cfg)[0].to(torch.bfloat16).eval()
        model = models[family]
        if family == "mamba_ssm":
            run = lambda: model.generate(prompt, max_length=prompt_len + new, cg=True, temperature=1.0, top_k=1)
        else:
            graphs = side != "ours_eager"
            run = lambda: model.generate(prompt, max_new_tokens=new, temperature=0, cuda_graphs=graphs)
        unfused = side == "ours_graphs_unfused"
        if unfused:
            set_decode_levers(model, False)
        if family != "mamba_ssm":  # the PDL kernel chain of model/fused_decode.py, or the layer-by-layer step
            # (ours_eager: the layer-by-layer reference the graph sides' greedy tokens are checked against)
            model.fused_decode = side not in ("ours_eager", "ours_graphs_layerwise", "ours_graphs_unfused",
                                              "ours_graphs_gemv")
        try:
            with gemv_linears(model) if side == "ours_graphs_gemv" else contextlib.nullcontext():
                first, second, out = timed(run)
                # the prompt alone, through the same decoder (its share of the per-token time)
                prefill_ms = None if family == "mamba_ssm" else 1e3 * time_cuda(
                    lambda: generation.make_decoder(model, 1, prompt_len + new, graphs).prefill(prompt), 5) / 5
                step_ms = None  # decoding alone: the captured step replayed after the prompt
                if family != "mamba_ssm" and graphs:
                    # replays bypass Decoder.step's room check: a cache with room for all 101
                    dec = generation.make_decoder(model, 1, prompt_len + 102, True)
                    dec.prefill(prompt)
                    step_ms = 1e3 * time_cuda(dec.graph.replay, 100) / 100
        except Exception as exc:  # noqa: BLE001 - report the other sides all the same
            print(f"{side} failed: {exc!r}", flush=True)
            continue
        finally:
            if unfused:
                set_decode_levers(model, True)
            if family != "mamba_ssm":
                model.fused_decode = True
        outs[side] = out[0, prompt_len:].tolist()
        rows.append(dict(side=side, tokens_per_s=round(new / second, 1), ms_per_token=round(second / new * 1e3, 3),
                         prefill_ms=prefill_ms and round(prefill_ms, 1),
                         step_ms=step_ms and round(step_ms, 4), decode_tokens_per_s=step_ms and round(1e3 / step_ms, 1),
                         first_call_s=round(first, 2),
                         params=sum(p.numel() for p in model.parameters()),
                         step_gb=None if family == "mamba_ssm" else round(step_bytes(model) / 1e9, 3)))
        print(json.dumps(rows[-1]), flush=True)
    models.pop("mamba_ssm", None)
    torch.cuda.empty_cache()
    return rows, models, outs, prompt


@torch.no_grad()
def compiled_reference_decode(model, prompt: torch.Tensor, new: int) -> tuple[dict, list[int]]:
    """Experiment: the pure-PyTorch decode step (reference SSM/conv/norm paths, no Triton
    kernels from mamba-ssm) through torch.compile, so Inductor fuses the elementwise work
    between the matmuls, then captured as one CUDA graph by hand. Greedy, batch 1."""
    from mamba_slm.model.layers import RMSNorm
    from mamba_slm.model.mamba2 import Mamba2Mixer
    saved = [(m, m._path) for m in model.modules() if isinstance(m, Mamba2Mixer)]
    norms = [m for m in model.modules() if isinstance(m, RMSNorm)]
    for m, _ in saved:
        m._path = "reference"
    for m in norms:
        m.use_kernel = False
    try:
        vocab = model.config.vocab_size
        dec = generation.Decoder(model, 1, 512, cuda_graphs=False)
        cache = dec.cache
        token = torch.zeros(1, 1, dtype=torch.long, device="cuda")
        step = torch.compile(lambda ids: model(ids, cache=cache).logits[:, -1, :vocab], dynamic=False)
        t0 = time.perf_counter()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                step(token)
                cache.reset()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            logits = step(token)
        compile_s = time.perf_counter() - t0

        def run():
            out = torch.empty(1, new, dtype=torch.long, device="cuda")
            nxt = dec.prefill(prompt).float().argmax(-1)
            for i in range(new):
                out[:, i] = nxt
                if i + 1 < new:
                    token.copy_(nxt[:, None])
                    graph.replay()
                    nxt = logits.float().argmax(-1)
            return out
        _, second, out = timed(run)
        row = dict(side="ours_graphs_compiled_reference", tokens_per_s=round(new / second, 1),
                   ms_per_token=round(second / new * 1e3, 3), first_call_s=round(compile_s, 2),
                   params=sum(p.numel() for p in model.parameters()))
        step_ms = time_cuda(graph.replay, 100) / 100 * 1e3
        print(json.dumps(row), f"graph replay alone: {step_ms:.3f} ms", flush=True)
        return row, out[0].tolist()
    finally:
        for m, path in saved:
            m._path = path
        for m in norms:
            m.use_kernel = True


def step_bytes(model) -> int:
    """Bytes a batch-1 step reads: every weight and buffer once (tied ones once), except the
    embedding table, of which one row is read."""
    return weights_nbytes(model) - model.embed_tokens.weight.numel() * model.embed_tokens.weight.element_size() \
        * (not model.config.tie_embeddings)


def first_divergence(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def capture(fn) -> torch.cuda.CUDAGraph:
    """fn() captured into a CUDA graph, after one warm-up call on a side stream."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def graph_ms(fn, iters: int = 200) -> float:
    """Capture fn() into a CUDA graph and return ms per replay."""
    return time_cuda(capture(fn).replay, iters) / iters * 1e3


@torch.no_grad()
def profile_step(model, prompt_len: int, bandwidth: float) -> list[dict]:
    """Where one decode step's time goes: parts replayed as their own graphs."""
    cfg = model.config
    dec = generation.graph_decoder(model, 1, 512)
    dec.prefill(torch.randint(0, cfg.vocab_size, (1, prompt_len), device="cuda"))
    rows = [dict(part="whole step (graph)", count=1, ms=time_cuda(dec.graph.replay, 100) / 100 * 1e3,
                 mb=sum(p.numel() for n, p in model.named_parameters() if "embed" not in n) * 2 / 1e6)]
    h = torch.randn(1, 1, cfg.hidden_size, device="cuda", dtype=torch.bfloat16)
    for kind in ("M", "A"):
        i = cfg.layer_pattern.index(kind)
        block, state = model.layers[i], dec.cache.layers[i]
        mb = sum(p.numel() for p in block.parameters()) * 2 / 1e6
        n = cfg.layer_pattern.count(kind)
        rows.append(dict(part=f"{kind} block", count=n, ms=graph_ms(lambda: block(h, h, state=state)), mb=mb))
        # the matmuls the step runs: one per Linear, one per packed group (q|k|v, gate|up)
        shapes = {id(m): tuple(m.weight.shape) for m in block.modules() if isinstance(m, torch.nn.Linear)}
        for group in (getattr(block.feed_forward, "gate_up", None), getattr(block.mixer, "qkv", None)):
            if group is not None and group.packed() is not None:
                for name in group.names:
                    shapes.pop(id(getattr(group.owner, name)))
                shapes[id(group)] = tuple(group.weight.shape)
        weights = [torch.randn(s, device="cuda", dtype=torch.bfloat16) for s in shapes.values()]
        inputs = [torch.randn(1, 1, w.shape[1], device="cuda", dtype=torch.bfloat16) for w in weights]
        rows.append(dict(part=f"  {kind} block: its {len(weights)} matmuls alone", count=n,
                         ms=graph_ms(lambda: [torch.nn.functional.linear(x, w) for w, x in zip(weights, inputs)]), mb=mb))
    head_mb = model.lm_head.weight.numel() * 2 / 1e6
    rows.append(dict(part="final norm + lm_head", count=1, mb=head_mb,
                     ms=graph_ms(lambda: model.lm_head(model.final_norm(h, h)[0]))))
    for r in rows:
        r["total_ms"] = round(r["ms"] * r["count"], 3)
        r["ms"] = round(r["ms"], 4)
        r["share_of_bandwidth"] = round(r["mb"] / 1e3 / (r["ms"] / 1e3) / (bandwidth * 1e3), 2)
        r["mb"] = round(r["mb"], 1)
    try:
        table, launches = kernel_profile(dec.graph.replay, calls=10, rows=18)
        print(f"\nkernels per step (profiler, 10 replays): {launches:.0f}\n{table}")
    except Exception as exc:  # noqa: BLE001 - the profile is extra information
        print(f"profiler failed: {exc!r}")
    return rows


@torch.no_grad()
def greedy_step_graph(dec) -> torch.cuda.CUDAGraph:
    """The decoder's step and a greedy argmax into its own input, captured as one graph
    (warmed up on a side stream first); the cache is reset after."""
    graph = capture(lambda: dec._token.copy_(dec._forward(dec._token).argmax(-1, keepdim=True)))
    dec.cache.reset()
    return graph


def generate_breakdown(model, prompt: torch.Tensor, new: int, cache_lens: list[int]) -> list[dict]:
    """Where generate's time per token goes beyond the captured step (ms per token, one
    decoder each, after the prompt): the step replayed at each cache length (attention
    reads the whole static cache, masked), `Decoder.step` in a loop (host work per token),
    that loop plus greedy sampling and the output write (generate without its prompt),
    and generate itself minus its prompt."""
    from mamba_slm.model import attention

    rows, T = [], prompt.shape[1]
    kernel_supported = attention.decode_attention_supported
    for sdpa in (True, False):  # decode attention: SDPA over the masked cache, then the kernel
        attention.decode_attention_supported = (lambda head_dim, group: False) if sdpa else kernel_supported
        for max_len in cache_lens:
            generation._GRAPH_DECODERS.pop(model, None)  # recapture with this attention
            dec = generation.make_decoder(model, 1, max_len, True)
            dec.prefill(prompt)
            n = min(new, dec.cache.max_len - T - 2)  # replays bypass the room check (+1 warm call)
            ms = time_cuda(dec.graph.replay, n) / n * 1e3
            rows.append(dict(what=f"graph.replay alone, cache {dec.cache.max_len}, "
                                  f"{'SDPA + mask' if sdpa else 'decode kernel'}", ms_per_token=round(ms, 4)))
    attention.decode_attention_supported = kernel_supported
    generation._GRAPH_DECODERS.pop(model, None)
    dec = generation.make_decoder(model, 1, T + new, True)  # generate's own cache length
    dec.prefill(prompt)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(64):
        dec.graph.replay()
    host = (time.perf_counter() - t0) / 64 * 1e3
    torch.cuda.synchronize()
    rows.append(dict(what="host time per graph.replay() call, 64 calls without a sync", ms_per_token=round(host, 4)))
    dec.prefill(prompt)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(new - 1):
        dec._token.copy_(prompt[:, -1:])
        dec.graph.replay()
    torch.cuda.synchronize()
    rows.append(dict(what="token copy + graph.replay loop, wall clock",
                     ms_per_token=round((time.perf_counter() - t0) / (new - 1) * 1e3, 4)))

    def wall(fn) -> float:  # ms per call of fn over new - 1 calls after the prompt
        dec.prefill(prompt)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(new - 1):
            fn()
        torch.cuda.synchronize()
        return round((time.perf_counter() - t0) / (new - 1) * 1e3, 4)

    rows.append(dict(what="graph.replay loop alone, wall clock", ms_per_token=wall(dec.graph.replay)))
    src = prompt[:, -1:].clone()
    copy_graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(copy_graph):
        dec._token.copy_(src)
    rows.append(dict(what="token copy as its own graph + graph.replay, wall clock",
                     ms_per_token=wall(lambda: (copy_graph.replay(), dec.graph.replay()))))
    greedy_graph = greedy_step_graph(dec)
    rows.append(dict(what="step + argmax into its own input, one graph, replay loop, wall clock",
                     ms_per_token=wall(greedy_graph.replay)))
    rows.append(dict(what="the same + a host read of the token every 16 steps",
                     ms_per_token=wall(lambda c=[0]: (greedy_graph.replay(), (c.__setitem__(0, c[0] + 1),
                                                      c[0] % 16 == 0 and dec._token.item())))))
    tok = prompt[:, -1]
    out = torch.empty(1, T + new + 1, dtype=prompt.dtype, device="cuda")
    out[:, :T] = prompt

    def steps(sample: bool):
        logits = dec.prefill(prompt)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for i in range(new - 1):
            nxt = generation.sample_next(logits, out[:, :T + i], temperature=0) if sample else tok
            if sample:
                out[:, T + i] = nxt
            logits = dec.step(nxt)
        torch.cuda.synchronize()
        return (time.perf_counter() - t0) / (new - 1) * 1e3

    for sample in (False, True):
        steps(sample)  # warm
        rows.append(dict(what=f"Decoder.step loop{' + sample_next + write' if sample else ''}, cache {dec.cache.max_len}",
                         ms_per_token=round(min(steps(sample) for _ in range(3)), 4)))
    prefill_ms = time_cuda(lambda: dec.prefill(prompt), 5) / 5 * 1e3
    gen_ms = time_cuda(lambda: model.generate(prompt, max_new_tokens=new, temperature=0, cuda_graphs=True), 3) / 3 * 1e3
    rows.append(dict(what=f"generate ({new} tokens) minus its prompt ({prefill_ms:.1f} ms)",
                     ms_per_token=round((gen_ms - prefill_ms) / new, 4)))
    try:
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            model.generate(prompt, max_new_tokens=64, temperature=0, cuda_graphs=True)
            torch.cuda.synchronize()
        print("\ngenerate, 64 new tokens, torch.profiler, by CPU time:\n" + prof.key_averages().table(
            sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=60))
    except Exception as exc:  # noqa: BLE001 - extra information
        print(f"generate profile failed: {exc!r}")
    return rows


def fused_step_rows(model, prompt: torch.Tensor, variants: list[str]) -> list[dict]:
    """The captured fused step (model/fused_decode.py) under other GEMV tilings, without PDL,
    and the layer-by-layer step: ms per replayed step, one capture each. A variant is
    "R1/R2/R3:BK:W" (rows per program for weights of up to 4,096 / 16,384 / more rows, the
    longest K tile, warps), "default", "nopdl" or "layerwise"."""
    from mamba_slm.model import fused_decode

    default_config, default_pdl = fused_decode.gemv_config, fused_decode.pdl_supported
    rows, T = [], prompt.shape[1]
    for spec in variants:
        if ":" in spec:
            r, bk, w = spec.split(":")
            r1, r2, r3 = (int(v) for v in r.split("/"))
            fused_decode.gemv_config = (lambda n, k, r1=r1, r2=r2, r3=r3, bk=int(bk), w=int(w):
                                        (r1 if n <= 4096 else r2 if n <= 16384 else r3,
                                         min(bk, fused_decode.triton.next_power_of_2(k)), w))
        if spec == "nopdl":
            fused_decode.pdl_supported = lambda device: False
        model.fused_decode = spec != "layerwise"
        generation._GRAPH_DECODERS.pop(model, None)
        try:
            t0 = time.perf_counter()
            dec = generation.make_decoder(model, 1, T + 102, True)
            capture_s = time.perf_counter() - t0
            dec.prefill(prompt)
            ms = time_cuda(dec.graph.replay, 100) / 100 * 1e3
            rows.append(dict(step=spec, fused=dec.fused, ms_per_step=round(ms, 4), tokens_per_s=round(1e3 / ms, 1),
                             capture_s=round(capture_s, 1)))
        except Exception as exc:  # noqa: BLE001 - the other variants still run
            rows.append(dict(step=spec, error=repr(exc)[:120]))
        finally:
            fused_decode.gemv_config, fused_decode.pdl_supported = default_config, default_pdl
            model.fused_decode = True
        print(json.dumps(rows[-1]), flush=True)
    generation._GRAPH_DECODERS.pop(model, None)
    return rows


def boundary_profile(model, prompt: torch.Tensor, new: int, out_dir: str | None = None) -> list[dict]:
    """Why work between two replays of the step costs ~0.1 ms per token (session 12): a
    CUDA trace (torch.profiler, kernels and copies on the device) of 32 tokens of each loop
    -- replays back to back, a token copy + replay, the step with a greedy argmax into its
    own input as one graph -- split into the GPU's busy time and its idle gaps per token,
    the largest gaps with the kernels around them, and the kernels whose time per token
    differs most between the first and the last loop."""
    import tempfile

    from torch.profiler import ProfilerActivity, profile

    generation._GRAPH_DECODERS.pop(model, None)
    T = prompt.shape[1]
    dec = generation.make_decoder(model, 1, T + new, True)
    greedy = greedy_step_graph(dec)
    src = prompt[:, -1:].clone()
    loops = {"replay back to back": dec.graph.replay,
             "token copy + replay": lambda: (dec._token.copy_(src), dec.graph.replay()),
             "step + argmax, one graph": greedy.replay}
    n, rows, per_name = 32, [], {}
    for what, fn in loops.items():
        dec.prefill(prompt)
        for _ in range(4):
            fn()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(n):
                fn()
            torch.cuda.synchronize()
        path = os.path.join(out_dir or tempfile.mkdtemp(), what.replace(" ", "_").replace(",", "").replace("+", "") + ".json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            evs = sorted((e for e in json.load(f)["traceEvents"]
                          if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")), key=lambda e: e["ts"])
        span = evs[-1]["ts"] + evs[-1]["dur"] - evs[0]["ts"]
        busy = sum(e["dur"] for e in evs)
        gaps = sorted(((b["ts"] - a["ts"] - a["dur"], a["name"][:40], b["name"][:40]) for a, b in zip(evs, evs[1:])),
                      reverse=True)
        names: dict[str, float] = {}
        for e in evs:
            names[e["name"][:70]] = names.get(e["name"][:70], 0.0) + e["dur"] / n
        per_name[what] = names
        rows.append(dict(loop=what, ops_per_token=round(len(evs) / n, 1), span_us=round(span / n, 1),
                         busy_us=round(busy / n, 1), idle_us=round((span - busy) / n, 1),
                         gaps_over_5us=sum(g > 5 for g, _, _ in gaps) / n,
                         largest_gaps=", ".join(f"{g:.0f}us {a} -> {b}" for g, a, b in gaps[:3])))
    first, last = per_name["replay back to back"], per_name["step + argmax, one graph"]
    diff = sorted(((last.get(k, 0.0) - first.get(k, 0.0), k) for k in set(first) | set(last)),
                  key=lambda t: -abs(t[0]))
    print("\nkernels whose time per token differs most, (step + argmax) minus (replays back to back), us:")
    for d, k in diff[:12]:
        print(f"  {d:+8.2f}  {first.get(k, 0.0):8.2f} -> {last.get(k, 0.0):8.2f}  {k}")
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="1.3B")
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--new", type=int, default=256)
    sides = ["ours_eager", "ours_graphs_unfused", "ours_graphs_layerwise", "ours_graphs", "ours_graphs_gemv",
             "ours_graphs_int8", "mamba_ssm_graphs"]
    p.add_argument("--sides", nargs="+", default=[s for s in sides if s not in ("ours_graphs_gemv", "ours_graphs_int8")],
                   choices=sides,
                   help="ours_graphs: the fused PDL step (model/fused_decode.py); ours_graphs_layerwise: "
                        "CUDA graphs of the layer-by-layer step (cuBLAS GEMVs); "
                        "ours_graphs_unfused: CUDA graphs without the packed matmuls and the RoPE kernel; "
                        "ours_graphs_gemv (experiment): CUDA graphs with every matmul an inductor GEMV; "
                        "ours_graphs_int8: the same weights quantized to INT8 weight-only "
                        "(platform/post/quantize.py), CUDA graphs; its ceiling is its own step_gb")
    p.add_argument("--gemv", action="store_true",
                   help="experiment: cuBLAS vs inductor GEMV for each weight shape of the model")
    p.add_argument("--check-tokens", type=int, default=32, help="greedy tokens that must agree, graph vs eager")
    p.add_argument("--profile", action="store_true")
    p.add_argument("--compiled", action="store_true",
                   help="also time the experimental torch.compile'd reference decode step")
    p.add_argument("--breakdown", type=int, nargs="*", metavar="CACHE_LEN",
                   help="where generate's time per token goes beyond the step (ours, bf16), the step "
                        "timed at these cache lengths (default: 256 512 2048 8192)")
    p.add_argument("--fused-variants", nargs="*", metavar="VARIANT",
                   help="the captured fused step with other GEMV tilings (R1/R2/R3:BK:W), without PDL (nopdl), "
                        "and the layer-by-layer step (layerwise); default: a small set")
    p.add_argument("--boundary", action="store_true",
                   help="a CUDA trace of the decode loops: busy vs idle time per token around the step's graph")
    p.add_argument("--trace-dir", default=None, help="keep --boundary's chrome traces here")
    p.add_argument("--out", default=None, help="append JSON lines here")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        p.error("needs a CUDA GPU")
    dev = torch.cuda.get_device_name()
    bw = copy_bandwidth_tbs()
    print(f"device: {dev}, torch {torch.__version__}, copy bandwidth {bw:.2f} TB/s", flush=True)
    cfg = ModelConfig.from_name(args.size)
    rows, models, outs, prompt = decode_rows(cfg, args.prompt, args.new, args.sides)
    ours, ours_int8 = models.get("ours"), models.pop("ours_int8", None)
    if not args.profile:
        ours_int8 = None
        torch.cuda.empty_cache()
    status = 0
    for side in ("ours_graphs_unfused", "ours_graphs_layerwise", "ours_graphs", "ours_graphs_gemv"):
        if "ours_eager" in outs and side in outs:
            agree = first_divergence(outs["ours_eager"], outs[side])
            ok = agree >= min(args.check_tokens, args.new)
            print(f"greedy tokens, {side} vs eager: identical for the first {agree} of {args.new} "
                  f"({'OK' if ok else 'MISMATCH'})", flush=True)
            status = status or (0 if ok else 1)
    if args.compiled and ours is not None:
        try:
            row, toks = compiled_reference_decode(ours, prompt, args.new)
            rows.append(row)
            if "ours_eager" in outs:
                print(f"compiled reference step vs eager kernel step: greedy tokens agree for the first "
                      f"{first_divergence(outs['ours_eager'], toks)} (different arithmetic; information only)")
        except Exception as exc:  # noqa: BLE001 - an experiment; the table still prints
            print(f"compiled variant failed: {exc!r}", flush=True)
    n_params = sum(p.numel() for p in ours.parameters()) if ours is not None else rows[0]["params"]
    bf16_bytes = 2 * (n_params - cfg.padded_vocab_size * cfg.hidden_size)
    ceiling = bw * 1e12 / bf16_bytes
    for r in rows:
        own = bw * 1e12 / (r["step_gb"] * 1e9) if r.get("step_gb") else ceiling  # INT8 reads fewer bytes
        r.update(device=dev, ceiling_tokens_per_s=round(own), share_of_ceiling=round(r["tokens_per_s"] / own, 2))
    if "ours_graphs_int8" in outs and "ours_graphs" in outs:
        print(f"greedy tokens, INT8 vs bf16 (both graphs): identical for the first "
              f"{first_divergence(outs['ours_graphs'], outs['ours_graphs_int8'])} of {args.new} "
              "(quantized weights: information only)", flush=True)
    if args.gemv and ours is not None:
        try:
            print(f"\none-row matmuls, bf16, each replayed in a CUDA graph (bandwidth {bw:.2f} TB/s):")
            print_table(gemv_rows(ours, bw))
        except Exception as exc:  # noqa: BLE001 - an experiment; the table still prints
            print(f"gemv table failed: {exc!r}", flush=True)
    if args.profile and ours is not None:
        try:
            parts = profile_step(ours, args.prompt, bw)
            print(f"\nwhere a step's time goes (each part replayed as its own graph; bandwidth {bw:.2f} TB/s):")
            print_table(parts)
        except Exception as exc:  # noqa: BLE001 - extra information; the table still prints
            print(f"profile failed: {exc!r}", flush=True)
    if args.profile and ours_int8 is not None:
        try:  # the INT8 step's kernels (its parts' table above is bf16's)
            dec = generation.graph_decoder(ours_int8, 1, 512)
            dec.prefill(prompt)
            table, launches = kernel_profile(dec.graph.replay, calls=10, rows=18)
            print(f"\nINT8 step: kernels per step (profiler, 10 replays): {launches:.0f}\n{table}")
        except Exception as exc:  # noqa: BLE001 - extra information
            print(f"INT8 profile failed: {exc!r}", flush=True)
    if args.breakdown is not None and ours is not None:
        try:
            print("\ngenerate's time per token (ours, bf16, CUDA graphs):")
            print_table(generate_breakdown(ours, prompt, args.new, args.breakdown or [256, 512, 2048, 8192]))
        except Exception as exc:  # noqa: BLE001 - extra information; the table still prints
            print(f"breakdown failed: {exc!r}", flush=True)
    if args.fused_variants is not None and ours is not None:
        print("\nthe captured step, fused variants (ours, bf16, batch 1, cache 512):")
        print_table(fused_step_rows(ours, prompt, args.fused_variants or [
            "default", "4/8/16:2048:4", "4/8/16:2048:8", "nopdl", "layerwise"]))
    if args.boundary and ours is not None:
        try:
            print("\nthe decode loop on the GPU, per token (ours, bf16, CUDA graphs, 32 tokens each):")
            print_table(boundary_profile(ours, prompt, args.new, args.trace_dir))
        except Exception as exc:  # noqa: BLE001 - extra information; the table still prints
            print(f"boundary profile failed: {exc!r}", flush=True)
    print(f"\ndecode, {args.size}, batch 1, prompt {args.prompt}, {args.new} new tokens, bf16, greedy; "
          f"{dev}; weights read per step {bf16_bytes / 1e9:.2f} GB (bf16)")
    print_table(rows)
    if args.out:
        with open(args.out, "a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    return status


if __name__ == "__main__":
    sys.exit(main())
