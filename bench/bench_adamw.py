"""torch AdamW on a GPU, `foreach` (torch's default) against `fused`, on what DeepSpeed's
ZeRO-2 hands it: one flat fp32 partition per parameter group (the job's two groups, decayed
matrices and the rest), sized from a model preset. Prints ms per optimizer step and the
bandwidth it moves (fused: read param, grad, exp_avg, exp_avg_sq; write three).

    python bench/bench_adamw.py --size 1.3B [--steps 20]
"""
from __future__ import annotations

import argparse
import sys

import torch


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="1.3B", help="mamba_slm model preset")
    p.add_argument("--steps", type=int, default=20)
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("bench_adamw: no CUDA GPU visible; this benchmark needs one.", file=sys.stderr)
        return 2
    from mamba_slm.model import HybridLM, ModelConfig

    with torch.device("meta"):
        model = HybridLM(ModelConfig.from_name(args.size))
    sizes = [0, 0]  # decayed matrices, the rest (platform/train/engine.py param_groups)
    for prm in model.parameters():
        sizes[prm.ndim < 2 or getattr(prm, "_no_weight_decay", False)] += prm.numel()
    print(f"{args.size}: {sum(sizes) / 1e9:.3f}B parameters in two flat fp32 groups {sizes}, "
          f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    print(f"{'AdamW':8s} {'ms/step':>8s} {'GB/s (7 x 4 B per param)':>26s}")
    for kind in ("foreach", "fused"):
        params = [torch.zeros(n, device="cuda", requires_grad=True) for n in sizes]
        for prm in params:
            prm.grad = torch.randn_like(prm) * 1e-3
        opt = torch.optim.AdamW([{"params": [params[0]], "weight_decay": 0.1},
                                 {"params": [params[1]], "weight_decay": 0.0}], lr=1e-4, **{kind: True})
        for _ in range(3):
            opt.step()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        for _ in range(args.steps):
            opt.step()
        end.record()
        torch.cuda.synchronize()
        ms = start.elapsed_time(end) / args.steps
        print(f"{kind:8s} {ms:8.2f} {7 * 4 * sum(sizes) / ms / 1e6:26.0f}", flush=True)
        del opt, params
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
