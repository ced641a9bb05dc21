"""Building FlexAttention's block mask of packed documents: the project's build from each
128-token block's id range (model/attention.py, `build_document_block_mask`) against
`create_block_mask`, which evaluates the mask at every (b, q, kv), eager and through
torch.compile; per sequence length, a table of build time and peak memory (CUDA:
torch.cuda.max_memory_allocated over the build; CPU: the process's peak RSS above its size
before the builds, so each case runs in a fresh subprocess; both over two builds, the first
of which compiles where compiled) and the blocks each found (partial + full, and full).

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


BUILDS = ("ranges", "create_block_mask", "create_block_mask compiled")


def one(device: str, T: int, build_name: str, docs: int) -> dict:
    import torch
    from torch.nn.attention.flex_attention import create_block_mask

    from mamba_slm.model import attention

    seq_idx = (torch.arange(T, device=device) * docs // T)[None].expand(2, T).contiguous()

    def dense(seq_idx):
        def same_document_causal(b, h, q, kv):
            return (q >= kv) & (seq_idx[b, q] == seq_idx[b, kv])
        return create_block_mask(same_document_causal, 2, None, T, T, device=seq_idx.device)

    build = {"ranges": attention.build_document_block_mask, "create_block_mask": dense,
             "create_block_mask compiled": torch.compile(dense, fullgraph=True)}[build_name]
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
            "blocks": int(mask.kv_num_blocks.sum() + mask.full_kv_num_blocks.sum()),
            "full": int(mask.full_kv_num_blocks.sum())}


def _rss_bytes() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--seqs", type=int, nargs="+", default=[8192, 16384, 32768])
    p.add_argument("--docs", type=int, default=8, help="documents per row (equal lengths)")
    p.add_argument("--builds", nargs="+", choices=BUILDS, default=list(BUILDS))
    p.add_argument("--timeout", type=float, default=300, help="seconds per case")
    p.add_argument("--one", help=argparse.SUPPRESS)  # "T,build": run one case, print JSON
    args = p.parse_args()
    if args.one:
        T, build = args.one.split(",", 1)
        print(json.dumps(one(args.device, int(T), build, args.docs)))
        return 0
    print(f"document block mask, batch 2, {args.docs} documents per row, {args.device}")
    head = (f"{'T':>7} {'build':>26} {'first s':>8} {'again ms':>9} {'peak GB':>8} {'blocks':>7} "
            f"{'full':>6}")
    print(head + "\n" + "-" * len(head))
    for T in args.seqs:
        for build in args.builds:
            try:
                out = subprocess.run([sys.executable, __file__, "--device", args.device, "--docs", str(args.docs),
                                      "--one", f"{T},{build}"], capture_output=True, text=True, timeout=args.timeout)
            except subprocess.TimeoutExpired:
                print(f"{T:>7} {build:>26}  over --timeout {args.timeout:.0f} s", flush=True)
                continue
            if out.returncode:
                print(f"{T:>7} {build:>26}  FAILED: {out.stderr.strip()[-300:]}", flush=True)
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"{T:>7} {build:>26} {r['first_s']:>8.2f} {1e3 * r['again_s']:>9.1f} {r['peak_gb']:>8.2f} "
                  f"{r['blocks']:>7} {r['full']:>6}", flush=True)
    print("first: the first build (the compile, where compiled); again: a second build; peak: the most "
          "memory the two builds added; blocks: partial + full key blocks, summed over query blocks")
    return 0


if __name__ == "__main__":
    sys.exit(main())
