"""Serve a model directory over HTTP with streamed tokens (FastAPI + uvicorn).

  python jobs/serve.py --checkpoint runs/final --port 8000
  curl -N localhost:8000/generate -H 'content-type: application/json' \
       -d '{"prompt": "ROMEO:", "max_new_tokens": 64, "stream": true}'
  curl localhost:8000/generate -H 'content-type: application/json' \
       -d '{"messages": [{"role": "user", "content": "Who wrote Hamlet?"}], "temperature": 0}'

Plain and quantized (jobs/quantize.py) model directories both load. Endpoints and the
event format are documented in mamba_slm.platform.post.serve. The default host is
127.0.0.1; pass --host 0.0.0.0 to listen on every interface (put authentication in front).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python jobs/serve.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, type=Path, help="model directory (plain or quantized)")
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="auto: the GPU when there is one (bf16, CUDA-graph decoding; INT8 models too), "
                        "else the CPU; INT4 models run on the CPU")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--max-context", type=int,
                   help="most tokens a request may use, prompt + max_new_tokens (default: the model's "
                        "max_seq_len; more only for a model that runs past it, e.g. with rope_scaling)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not 0 < args.port < 65536:
        parser.error(f"--port {args.port}: give a TCP port in 1-65535")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads {args.threads} must be positive")
    if args.max_context is not None and args.max_context < 2:
        parser.error(f"--max-context {args.max_context}: give at least 2 tokens (a prompt and one new token)")
    from mamba_slm.platform.extras import missing_extra

    if msg := missing_extra("post", ("fastapi", "uvicorn"), what="serving"):
        parser.error(msg)
    import uvicorn

    from mamba_slm.platform.post.loading import load_model_dir, place
    from mamba_slm.platform.post.serve import create_app

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible here; use --device cpu")
    try:
        loaded = load_model_dir(args.checkpoint)
    except (FileNotFoundError, ValueError) as exc:
        parser.error(f"--checkpoint: {exc}")
    device = args.device
    if device == "auto":  # an INT4 model runs on the CPU even where there is a GPU
        device = "cuda" if torch.cuda.is_available() and not loaded.cpu_only else "cpu"
    try:
        place(loaded, device)
    except ValueError as exc:
        parser.error(f"--checkpoint: {exc}")
    uvicorn.run(create_app(loaded, args.max_context), host=args.host, port=args.port, log_level=args.log_level)
    return 0


if __name__ == "__main__":
    sys.exit(main())
