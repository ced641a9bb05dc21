"""Building FlexAttention's block mask of packed documents (model/attention.py,
`document_block_mask`): eager against torch.compile, per sequence length; prints a table of
build time and peak memory (CUDA: torch.cuda.max_memory_allocated over the build; CPU: the
process's peak RSS above its size before the builds, so each case runs in a fresh
subprocess; both over two builds, the first of which compiles).

    python bench/bench_block_mask.py                       # CPU, T = 8K, 16K, 32K
    python bench/bench_block_mask.py --device cuda --seqs 8192 32768 131072
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def one(device: str, T: int, compiled: bool, docs: int) -> dict:
    import torch

    from mamba_slm.model import attention

    seq_idx = (torch.arange(T, device=device) * docs // T)[None].expand(2, T).contiguous()
    plain = attention.build_document_block_mask.__wrapped__
    build = torch.compile(plain, fullgraph=True) if compiled else plain  # compiled: as fused_on_gpu on a GPU
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if device == "cuda" else _rss_bytes()
    times = []
    for _ in range(2):  # the first build of a compiled one compiles
        t = time.perf_counter()
        mask = build(seq_idx.clone())
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    peak = (torch.cuda.max_memory_allocated() if device == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) - base
    return {"first_s": times[0], "again_s": times[1], "peak_gb": peak / 2**30,
            "blocks": int(mask.kv_num_blocks.sum() + mask.full_kv_num_blocks.sum())}


def _rss_bytes() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--seqs", type=int, nargs="+", default=[8192, 16384, 32768])
    p.add_argument("--docs", type=int, default=8, help="documents per row (equal lengths)")
    p.add_argument("--one", help=argparse.SUPPRESS)  # "T,compiled": run one case, print JSON
    args = p.parse_args()
    if args.one:
        T, compiled = args.one.split(",")
        print(json.dumps(one(args.device, int(T), compiled == "1", args.docs)))
        return 0
    print(f"document block mask, batch 2, {args.docs} documents per row, {args.device}")
    head = f"{'T':>7} {'build':>9} {'first s':>8} {'again s':>8} {'peak GB':>8} {'blocks':>7}"
    print(head + "\n" + "-" * len(head))
    for T in args.seqs:
        for compiled in (False, True):
            out = subprocess.run([sys.executable, __file__, "--device", args.device, "--docs", str(args.docs),
                                  "--one", f"{T},{int(compiled)}"], capture_output=True, text=True)
            if out.returncode:
                print(f"{T:>7} {'compiled' if compiled else 'eager':>9}  FAILED: {out.stderr.strip()[-300:]}")
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"{T:>7} {'compiled' if compiled else 'eager':>9} {r['first_s']:>8.2f} {r['again_s']:>8.2f} "
                  f"{r['peak_gb']:>8.2f} {r['blocks']:>7}", flush=True)
    print("first: the first build (compiling, for 'compiled'); again: a second build; peak: the most "
          "memory the two builds added")
    return 0


if __name__ == "__main__":
    sys.exit(main())
