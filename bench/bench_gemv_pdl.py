"""Batch-1 decode GEMVs on one GPU: cuBLAS vs a Triton GEMV, plain, with Programmatic
Dependent Launch (PDL, sm90+), and with PDL plus weight prefetch.

    python bench/bench_gemv_pdl.py [--preset 1.3B] [--glue both|on|off] [--replays 200] [--weights int8]

The chain is the ~97 GEMVs of one decode step, each weight its own bf16 tensor (~2.7 GB for
1.3B: nothing stays in L2); each reads the previous output sliced to its K, optionally via
a tiny "glue" kernel standing in for the conv / norm kernels. One CUDA graph per variant.
Prefetch: weights are never written by an earlier kernel, so each program loads its first
weight tile before gdc_wait() and the next GEMV's weight stream starts while the previous
one drains (the idea of CUTLASS example 63, "hopper gemm with weight prefetch"). PDL API of
Triton 3.6 (python/tutorials/11-programmatic-dependent-launch.py): the launch kwarg
`launch_pdl=True`; in the kernel `tl.extra.cuda.gdc_wait()` / `gdc_launch_dependents()`.
Block sizes: a small per-shape sweep with a cold L2, not triton.autotune (which must not
run inside a graph capture). tok/s = 1000 / (chain ms + --rest-ms, the non-GEMV rest).
`--weights int8`: INT8 weight-only (int8 codes, a bf16 scale per row, as
platform/post/quantize.py's Int8Linear), half the bytes; the first row is then the
project's inductor GEMV (`int8_gemv`) instead of cuBLAS.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import statistics
import sys

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

SWEEP = ((2, 1024, 4), (2, 2048, 4), (4, 1024, 4), (4, 2048, 8), (8, 1024, 8), (8, 2048, 8))
SWEEP_INT8 = SWEEP + ((4, 4096, 8), (8, 4096, 8), (16, 2048, 8))  # int8 rows are half as wide in bytes
# 1.3B preset of mamba_slm.model.ModelConfig, used when the package is not importable.
FALLBACK_1P3B = dict(layer_pattern="AMMMMMAMMMMAMMMMAMMMMMAA", hidden=2048, mlp=4864,
                     mamba_in=8512, mamba_inner=4096, attn_qkv=3072, attn_o_in=2048, vocab=50304)


@triton.jit
def gemv_kernel(w_ptr, x_ptr, y_ptr, s_ptr, N, K, stride_wn,
                BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                USE_PDL: tl.constexpr, PREFETCH: tl.constexpr, HAS_SCALE: tl.constexpr):
    """y[rows] = W[rows, :] @ x for BLOCK_N rows; fp32 accumulate, output in y's dtype;
    with HAS_SCALE (int8 W) times the row's scale."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_K)
    row_ok = rows < N
    w_rows = w_ptr + rows[:, None] * stride_wn  # (BLOCK_N, 1)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    if PREFETCH:  # weights are never written by an earlier kernel: safe before the wait
        w0 = tl.load(w_rows + cols[None, :], mask=row_ok[:, None] & (cols[None, :] < K), other=0.0)
    if USE_PDL:
        # x was written by the previous kernel: wait for it (all its memory is visible
        # after the wait), then let the next kernel launch; its programs prefetch while
        # ours stream the rest of W.
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    k_start = 0
    if PREFETCH:
        x0 = tl.load(x_ptr + cols, mask=cols < K, other=0.0)
        acc += w0.to(tl.float32) * x0.to(tl.float32)[None, :]
        k_start = BLOCK_K
    for k0 in range(k_start, K, BLOCK_K):
        k = k0 + cols
        w = tl.load(w_rows + k[None, :], mask=row_ok[:, None] & (k[None, :] < K), other=0.0)
        x = tl.load(x_ptr + k, mask=k < K, other=0.0)
        acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
    y = tl.sum(acc, axis=1)
    if HAS_SCALE:
        y = y * tl.load(s_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + rows, y.to(y_ptr.dtype.element_ty), mask=row_ok)


@triton.jit
def glue_kernel(src_ptr, dst_ptr, K, BLOCK: tl.constexpr, USE_PDL: tl.constexpr):
    """dst[:K] = src[:K] through fp32: stands in for a small conv / norm kernel."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    v = tl.load(src_ptr + offs, mask=offs < K, other=0.0).to(tl.float32)
    tl.store(dst_ptr + offs, v.to(dst_ptr.dtype.element_ty), mask=offs < K)


@dataclasses.dataclass(frozen=True)
class Variant:
    name: str
    triton: bool
    pdl: bool = False
    prefetch: bool = False


INT8_GEMV = None  # --weights int8: mamba_slm's int8_gemv, set in main
VARIANTS = (Variant("cublas", False), Variant("triton", True),
            Variant("pdl", True, pdl=True), Variant("pdl+prefetch", True, pdl=True, prefetch=True))


def gemv(w, x, y, cfg, variant: Variant, scale=None) -> None:
    n, k = w.shape
    block_n, block_k, num_warps = cfg
    launch = {"launch_pdl": True} if variant.pdl else {}
    gemv_kernel[(triton.cdiv(n, block_n),)](w, x, y, w if scale is None else scale, n, k, w.stride(0),
                                            BLOCK_N=block_n, BLOCK_K=block_k,
                                            USE_PDL=variant.pdl, PREFETCH=variant.prefetch,
                                            HAS_SCALE=scale is not None, num_warps=num_warps, **launch)


def inductor_int8_gemv():
    """The project's INT8 one-row product (inductor-compiled), or None if not importable."""
    try:
        from mamba_slm.platform.post.quantize import int8_gemv
    except ImportError:
        return None
    return int8_gemv


def decode_shapes(preset: str) -> tuple[str, list[tuple[str, int, int]], str]:
    """-> (layer pattern, [(name, N, K)] of one decode step in order, where the dims came from)."""
    try:
        from mamba_slm.model import ModelConfig
        cfg = ModelConfig.from_name(preset)
        d = dict(layer_pattern=cfg.layer_pattern, hidden=cfg.hidden_size, mlp=cfg.mlp_hidden_size,
                 mamba_inner=cfg.mamba_inner_size, attn_qkv=(cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim,
                 attn_o_in=cfg.n_heads * cfg.head_dim, vocab=cfg.padded_vocab_size)
        # in_proj -> [z | x B C | dt] (model/mamba2.py)
        d["mamba_in"] = 2 * cfg.mamba_inner_size + 2 * cfg.mamba_n_groups * cfg.mamba_d_state + cfg.mamba_n_heads
        source = f"mamba_slm ModelConfig.from_name({preset!r})"
    except ImportError:
        if preset != "1.3B":
            sys.exit(f"mamba_slm is not importable: only --preset 1.3B is built in, not {preset!r}")
        d, source = FALLBACK_1P3B, "built-in 1.3B dims (mamba_slm not importable)"
    h, mlp = d["hidden"], d["mlp"]
    steps = []
    for i, kind in enumerate(d["layer_pattern"]):
        if kind == "M":
            steps += [(f"{i}.in_proj", d["mamba_in"], h), (f"{i}.out_proj", h, d["mamba_inner"])]
        else:
            steps += [(f"{i}.qkv", d["attn_qkv"], h), (f"{i}.o", h, d["attn_o_in"])]
        steps += [(f"{i}.gate_up", 2 * mlp, h), (f"{i}.down", h, mlp)]
    steps.append(("lm_head", d["vocab"], h))
    return d["layer_pattern"], steps, source


class Chain:
    """Weights, input and per-step buffers of one decode step's GEMVs."""

    def __init__(self, steps, device="cuda", dtype=torch.bfloat16, int8=False):
        g = torch.Generator(device=device).manual_seed(0)
        # N(0, 1/K) keeps the activations' scale along the chain (no norms in between).
        self.weights = [torch.randn(n, k, device=device, dtype=dtype, generator=g) * k ** -0.5
                        for _, n, k in steps]
        self.scales = [None] * len(steps)
        if int8:  # per-row absmax codes, as Int8Linear.from_linear
            self.scales = [(w.float().abs().amax(1) / 127).to(dtype) for w in self.weights]
            self.weights = [torch.round(w.float() / s.float()[:, None]).clamp(-127, 127).to(torch.int8)
                            for w, s in zip(self.weights, self.scales)]
        self.x0 = torch.randn(steps[0][2], device=device, dtype=dtype, generator=g)
        self.outs = [torch.empty(n, device=device, dtype=dtype) for _, n, _ in steps]
        self.xbufs = [torch.empty(k, device=device, dtype=dtype) for _, _, k in steps]
        self.bytes = sum(t.numel() * t.element_size() for t in self.weights + self.scales if t is not None)

    def run(self, variant: Variant, configs: dict, use_glue: bool) -> torch.Tensor:
        prev = None
        for i, w in enumerate(self.weights):
            k = w.shape[1]
            if prev is None:
                x = self.x0
            elif use_glue:
                launch = {"launch_pdl": True} if variant.pdl else {}
                glue_kernel[(triton.cdiv(k, 1024),)](prev, self.xbufs[i], k, BLOCK=1024,
                                                     USE_PDL=variant.pdl, **launch)
                x = self.xbufs[i]
            else:
                x = prev[:k]
            if variant.triton:
                gemv(w, x, self.outs[i], configs[tuple(w.shape)], variant, self.scales[i])
                prev = self.outs[i]
            elif self.scales[i] is not None:
                prev = INT8_GEMV(x[None], w, self.scales[i])[0]
            else:
                prev = F.linear(x[None], w)[0]
        return prev

    def step_error(self, use_glue: bool) -> float:
        """Worst over the GEMVs of max|y - W x| / max|W x| (W x in fp32; bf16 rounding of y
        gives < 0.008), x being the input that GEMV read (after a Triton run); inf where a
        glue copy is wrong or a NaN shows (the buffers are NaN-poisoned before the checked
        run, so a read that raced ahead of its producer shows as NaN)."""
        errs = []
        for i, w in enumerate(self.weights):
            k = w.shape[1]
            x = self.x0 if i == 0 else self.xbufs[i] if use_glue else self.outs[i - 1][:k]
            if i and use_glue and not torch.equal(x, self.outs[i - 1][:k]):
                return float("inf")
            wf = w.float() if self.scales[i] is None else w.float() * self.scales[i].float()[:, None]
            want = torch.mv(wf, x.float())
            errs.append((self.outs[i].float() - want).abs().max() / want.abs().max())
        return torch.stack(errs).nan_to_num(nan=float("inf")).max().item()


def capture(fn):
    """-> (CUDA graph of fn, its static output); one eager warm-up call first (Triton
    compiles, cuBLAS initialises) on a side stream, as torch.cuda.graphs advises."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    gc.collect()
    gc.disable()  # no finaliser of a Triton kernel may run mid-capture (triton-lang/triton#10712)
    try:
        with torch.cuda.graph(graph):
            out = fn()
    finally:
        gc.enable()
    torch.cuda.synchronize()
    return graph, out


def median_ms(fn, calls: int, rounds: int, flush: torch.Tensor) -> float:
    """Median over rounds of ms per call of fn (CUDA events); L2 flushed (a 256 MB write)
    before each round."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(rounds):
        flush.zero_()
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / calls)
    return statistics.median(times)


def sweep(chain: Chain, variant: Variant, flush: torch.Tensor) -> dict:
    """Per weight shape: the config of SWEEP with the least time for all the chain's GEMVs
    of that shape (one graph, cold L2 per replay). -> {(N, K): (BLOCK_N, BLOCK_K, warps)}."""
    by_shape: dict[tuple, list[int]] = {}
    for i, w in enumerate(chain.weights):
        by_shape.setdefault(tuple(w.shape), []).append(i)
    best = {}
    for (n, k), idx in by_shape.items():
        x = torch.randn(k, device="cuda", dtype=torch.bfloat16)
        results = []
        for cfg in SWEEP_INT8 if chain.scales[0] is not None else SWEEP:
            def fn(cfg=cfg):
                for i in idx:
                    gemv(chain.weights[i], x, chain.outs[i], cfg, variant, chain.scales[i])
            try:
                graph, _ = capture(fn)
                results.append((median_ms(graph.replay, 1, 7, flush) / len(idx), cfg))
            except Exception as e:  # a config that fails here is left out, the others stay
                print(f"  sweep {variant.name} {n}x{k} {cfg} failed: {type(e).__name__}: {str(e)[:200]}",
                      flush=True)
        if not results:
            raise RuntimeError(f"no config of SWEEP ran for {n}x{k}")
        us, best[(n, k)] = min(results)
        print(f"  sweep {variant.name:13s} {n:6d}x{k:<5d} x{len(idx):2d}: BLOCK_N,BLOCK_K,warps="
              f"{best[(n, k)]}  {1e3 * us:6.1f} us/GEMV  {chain.weights[idx[0]].element_size() * n * k / (us * 1e6):6.0f} GB/s", flush=True)
    return best


def copy_bandwidth_gbs(flush: torch.Tensor, gib: int = 2) -> float:
    """Device-to-device copy, bytes read + written per second (GB/s)."""
    a = torch.empty(gib << 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    b.copy_(a)
    return 2 * a.numel() / median_ms(lambda: b.copy_(a), 10, 3, flush) / 1e6


def pdl_support() -> str:
    """'' when PDL can be used here, else why not."""
    major, minor = torch.cuda.get_device_capability()
    if major < 9:
        return f"GPU is sm{major}{minor}; PDL needs sm90+"
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
        tl.extra.cuda.gdc_wait, tl.extra.cuda.gdc_launch_dependents  # both must exist
    except (ImportError, AttributeError) as e:
        return f"Triton {triton.__version__} lacks PDL support ({type(e).__name__}: {e})"
    if "launch_pdl" not in CUDAOptions.__dataclass_fields__:
        return f"Triton {triton.__version__} has no launch_pdl launch option"
    return ""


def chain_row(chain: Chain, variant: Variant, configs: dict, use_glue: bool, args, copy_gbs: float,
              flush: torch.Tensor, ref: list) -> str:
    """Time one variant's chain (one graph) and check it: each Triton GEMV against W x in
    fp32 for the x it read (three runs on NaN-poisoned buffers), and the final output
    against ref[0], the first row's (cuBLAS, no glue; the glue is an exact copy)."""
    graph, out = capture(lambda: chain.run(variant, configs, use_glue))
    ms = median_ms(graph.replay, args.replays, args.rounds, flush)
    step_err = 0.0 if variant.triton else float("nan")  # cuBLAS's outputs are the graph's own
    for _ in range(3 if variant.triton else 1):
        for buf in chain.outs + chain.xbufs:
            buf.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        if variant.triton:
            step_err = max(step_err, chain.step_error(use_glue))
    if not ref:
        ref.append(out.float().clone())
    err = ((out.float() - ref[0]).norm() / ref[0].norm()).nan_to_num(nan=float("inf")).item()
    # Rounding to bf16 at every step makes two correct chains drift apart by ~3% over 97
    # GEMVs (simulated on the CPU), so the final output is a coarse check only.
    note = ("MISMATCH: a GEMV or glue is wrong" if step_err >= 1e-2 else
            "final output off by > 10%" if err >= 0.1 else "ok")
    gbs = chain.bytes / ms / 1e6
    return ROW.format(variant.name, "on" if use_glue else "off", ms, gbs, gbs / copy_gbs,
                      1e3 / (ms + args.rest_ms), step_err, err, note)


ROW = "{:13s} {:4s} {:8.3f} {:6.0f} {:6.1%} {:6.0f} {:8.1e} {:9.1e}  {}"
HEADER = (f"{'variant':13s} {'glue':4s} {'ms/chain':>8s} {'GB/s':>6s} {'%copy':>6s} {'tok/s':>6s} "
          f"{'step.err':>8s} {'final.err':>9s}  note")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="1.3B", help="mamba_slm model preset (default 1.3B)")
    p.add_argument("--glue", choices=("both", "off", "on"), default="both",
                   help="time the chain without / with the glue kernels between GEMVs")
    p.add_argument("--replays", type=int, default=200, help="graph replays per timing round")
    p.add_argument("--rounds", type=int, default=5, help="timing rounds (the median is reported)")
    p.add_argument("--rest-ms", type=float, default=0.24,
                   help="non-GEMV GPU time of a decode step, for the tok/s column")
    p.add_argument("--weights", choices=("bf16", "int8"), default="bf16",
                   help="int8: INT8 weight-only, a bf16 scale per row; the first row is the project's int8_gemv")
    args = p.parse_args()
    global INT8_GEMV
    if not torch.cuda.is_available():
        print("bench_gemv_pdl: no CUDA GPU visible; this benchmark needs one (an H200).", file=sys.stderr)
        sys.exit(2)

    cap = torch.cuda.get_device_capability()
    print(f"device {torch.cuda.get_device_name()} (sm{cap[0]}{cap[1]}), torch {torch.__version__}, "
          f"triton {triton.__version__}", flush=True)
    pattern, steps, source = decode_shapes(args.preset)
    chain = Chain(steps, int8=args.weights == "int8")
    variants = VARIANTS
    if args.weights == "int8":
        INT8_GEMV = inductor_int8_gemv()
        variants = VARIANTS[1:] if INT8_GEMV is None else (Variant("int8_gemv", False),) + VARIANTS[1:]
    print(f"shapes from {source}; pattern {pattern}; {len(steps)} GEMVs, {chain.bytes / 1e9:.2f} GB "
          f"of weights; distinct (N, K): {sorted({(n, k) for _, n, k in steps})}", flush=True)
    flush = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    copy_gbs = copy_bandwidth_gbs(flush)
    ceiling_ms = chain.bytes / copy_gbs / 1e6
    print(f"copy bandwidth {copy_gbs:.0f} GB/s -> chain ceiling {ceiling_ms:.3f} ms", flush=True)
    no_pdl = pdl_support()
    if no_pdl:
        print(f"skipping the PDL variants: {no_pdl}", flush=True)

    rows, ref = [ROW.format("copy ceiling", "-", ceiling_ms, copy_gbs, 1.0, 1e3 / (ceiling_ms + args.rest_ms),
                            0.0, 0.0, "weights / copy bandwidth")], []
    print(HEADER + "\n" + rows[0], flush=True)
    for variant in variants:
        if variant.pdl and no_pdl:
            rows.append(f"{variant.name:13s} skipped: {no_pdl}")
            continue
        try:
            configs = sweep(chain, variant, flush) if variant.triton else {}
        except Exception as e:  # keep the other rows
            rows.append(f"{variant.name:13s} FAILED in sweep: {type(e).__name__}: {str(e)[:300]}")
            print(rows[-1], flush=True)
            continue
        for use_glue in {"off": (False,), "on": (True,), "both": (False, True)}[args.glue]:
            try:
                rows.append(chain_row(chain, variant, configs, use_glue, args, copy_gbs, flush, ref))
            except Exception as e:  # keep the other rows
                rows.append(f"{variant.name:13s} {'on' if use_glue else 'off':4s} FAILED: "
                            f"{type(e).__name__}: {str(e)[:300]}")
            print(rows[-1], flush=True)
    print("\n" + HEADER)
    print("\n".join(rows), flush=True)


if __name__ == "__main__":
    main()
