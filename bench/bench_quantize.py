"""Weight-only quantization benchmark: size, CPU speed and held-out perplexity of a model
directory in fp32, bf16, INT8 and INT4 (prints a table; not a timed test).

    python bench/bench_quantize.py --checkpoint runs/final --text held_out.txt [--threads 2]

- size: bytes of all weights and buffers in memory (tied tensors once).
- prefill: ms of one forward over (1, --prefill-len) tokens.
- decode: tokens/s of greedy `model.generate` (KV/SSM cache) for --new-tokens tokens
  after a 32-token prompt.
Timings are the best of --repeats rounds, the variants interleaved within each round, so
that load from other processes on a shared machine hits them alike.
- ppl: next-token perplexity over --max-windows windows of the model's trained context,
  taken from the held-out text (`long_document_perplexity`, the model's own forward).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from mamba_slm.platform.post.long_context import long_document_perplexity, tokenize_documents
from mamba_slm.platform.post.loading import load_model_dir
from mamba_slm.platform.post.quantize import QuantConfig, quantize_model, weights_nbytes


def variant(path: Path, name: str, group_size: int):
    model = load_model_dir(path).model
    if name == "bf16":
        return model.to(torch.bfloat16)
    if name.startswith("int"):
        return quantize_model(model, QuantConfig(bits=int(name[3:]), group_size=group_size))
    return model


def best_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


@torch.no_grad()
def measure(models: dict, docs, prefill_len: int, new_tokens: int, max_windows: int, repeats: int) -> dict:
    ids = torch.cat(docs)[: prefill_len][None]
    prefill = {name: [] for name in models}
    decode = {name: [] for name in models}
    for _ in range(repeats):
        for name, model in models.items():
            prefill[name].append(best_time(lambda: model(ids), 1))
            decode[name].append(best_time(
                lambda: model.generate(ids[:, :32], max_new_tokens=new_tokens, temperature=0.0), 1))
    rows = {}
    for name, model in models.items():
        ppl = long_document_perplexity(model, docs, model.config.max_seq_len, max_windows=max_windows)
        rows[name] = {"bytes": weights_nbytes(model), "prefill_ms": 1e3 * min(prefill[name]),
                      "decode_tok_s": new_tokens / min(decode[name]), "ppl": ppl["ppl"],
                      "ppl_tokens": ppl["tokens"]}
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python bench/bench_quantize.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, type=Path, help="float model directory")
    p.add_argument("--text", required=True, type=Path, nargs="+", help="held-out text files")
    p.add_argument("--variants", nargs="+", default=["fp32", "bf16", "int8", "int4"],
                   choices=["fp32", "bf16", "int8", "int4"])
    p.add_argument("--group-size", type=int, default=32, help="INT4 group size")
    p.add_argument("--prefill-len", type=int, default=256)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--max-windows", type=int, default=16)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--output", type=Path, help="write the rows as JSON")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    loaded = load_model_dir(args.checkpoint)
    texts = [t.read_text(encoding="utf-8", errors="replace") for t in args.text]
    docs = tokenize_documents(loaded.tokenizer, texts, loaded.eos_id)
    models = {name: variant(args.checkpoint, name, args.group_size) for name in args.variants}
    rows = measure(models, docs, args.prefill_len, args.new_tokens, args.max_windows, args.repeats)
    base = rows.get("fp32", next(iter(rows.values())))
    print(f"{'variant':<8}{'MiB':>9}{'size':>7}{'prefill ms':>12}{'speedup':>9}{'decode tok/s':>14}"
          f"{'ppl':>10}{'d ppl':>9}")
    for name, r in rows.items():
        print(f"{name:<8}{r['bytes'] / 2**20:>9.2f}{r['bytes'] / base['bytes']:>7.2f}{r['prefill_ms']:>12.1f}"
              f"{base['prefill_ms'] / r['prefill_ms']:>9.2f}{r['decode_tok_s']:>14.1f}{r['ppl']:>10.3f}"
              f"{r['ppl'] - base['ppl']:>+9.3f}")
    print(f"(threads={args.threads}, ppl over {base['ppl_tokens']} held-out tokens, "
          f"context {loaded.model.config.max_seq_len})")
    if args.output:
        args.output.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows},
                                          indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
