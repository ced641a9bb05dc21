"""Sample text from a trained model.

    python jobs/generate.py --checkpoint runs/quick_test-tiny/model --prompt "To be, or not"
    python jobs/generate.py --checkpoint runs/quick_test-tiny --prompt "def main(" --temperature 0.7 --top-p 0.9

--checkpoint takes a final model directory (config.json + model.safetensors), a training
checkpoint (step_NNNNNNNN/), or a run directory (its latest checkpoint). The tokenizer is
the model directory's tokenizer.json unless --tokenizer is given.
Exit codes: 0 done, 2 bad arguments.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python jobs/generate.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="model dir, checkpoint dir or run dir")
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--tokenizer", help="tokenizer.json (default: the one beside the weights)")
    p.add_argument("--max-new-tokens", "--max_new_tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", "--top_k", type=int, default=50, help="0 = off")
    p.add_argument("--top-p", "--top_p", type=float, default=0.95, help="nucleus mass; 1 = off")
    p.add_argument("--repetition-penalty", "--repetition_penalty", type=float, default=1.1)
    p.add_argument("--num-samples", "--num_samples", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="auto (default): the GPU when there is one, else the CPU; INT4 models run on the CPU")
    return p


def find_tokenizer(checkpoint: Path) -> Path | None:
    """tokenizer.json beside the weights, in model/, or in the training data directory."""
    for candidate in (checkpoint / "tokenizer.json", checkpoint / "model" / "tokenizer.json"):
        if candidate.is_file():
            return candidate
    from mamba_slm.platform.fault.integrity import checkpoints_newest_first

    # newest first, by (step, revision): step_N-r10 after step_N-r2; a torn one has no state file
    ckpts = checkpoints_newest_first(checkpoint)
    for state in [checkpoint / "train_state.json", *(c / "train_state.json" for c in ckpts)]:
        if state.is_file():
            data = Path(json.loads(state.read_text())["config"]["data"]["path"]) / "tokenizer.json"
            if data.is_file():
                return data
    return None


def eos_id_of(checkpoint: Path, tokenizer) -> int | None:
    """config.json's eos_id, else the tokenizer's end-of-text token as jobs/serve.py and
    jobs/evaluate.py find it (`<|endoftext|>`, `</s>`, ...); None: none, generation runs to
    --max-new-tokens."""
    from mamba_slm.platform.evaluate.checkpoint import CheckpointError, find_eos

    configs = [c for c in (checkpoint / "config.json", checkpoint / "model" / "config.json") if c.is_file()]
    metadata = json.loads(configs[0].read_text()) if configs else None
    try:
        return find_eos(tokenizer, metadata)[0]
    except CheckpointError:
        return None


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from mamba_slm.model.generation import MIN_SAMPLING_PARAM

    checkpoint = Path(args.checkpoint)
    problems = []
    if not checkpoint.exists():
        problems.append(f"--checkpoint {checkpoint} does not exist")
    if args.max_new_tokens < 1 or args.num_samples < 1:
        problems.append("--max-new-tokens and --num-samples must be >= 1")
    if not (args.temperature == 0 or MIN_SAMPLING_PARAM <= args.temperature < math.inf):
        problems.append(f"--temperature must be 0 (greedy) or a finite number >= {MIN_SAMPLING_PARAM:g}")
    if not (MIN_SAMPLING_PARAM <= args.top_p <= 1) or args.top_k < 0 \
            or not MIN_SAMPLING_PARAM <= args.repetition_penalty < math.inf:
        problems.append(f"--top-p must be in [{MIN_SAMPLING_PARAM:g}, 1], --top-k >= 0, --repetition-penalty "
                        f"a finite number >= {MIN_SAMPLING_PARAM:g}")
    tok_path = Path(args.tokenizer) if args.tokenizer else (find_tokenizer(checkpoint) if checkpoint.exists() else None)
    if not problems and (tok_path is None or not tok_path.is_file()):
        problems.append(f"no tokenizer.json found for {checkpoint}; pass --tokenizer PATH")
    if problems:
        parser.error("; ".join(problems))

    import torch
    from tokenizers import Tokenizer

    from mamba_slm.platform.post.quantize import cpu_only
    from mamba_slm.platform.train.checkpoint import load_model

    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible here; use --device cpu")
    try:
        tokenizer = Tokenizer.from_file(str(tok_path))
    except Exception as err:  # tokenizers raises a bare Exception for a file it cannot read
        parser.error(f"{tok_path} is not a tokenizer.json (tokenizers says: {err}); pass the one the model "
                     f"was trained with as --tokenizer PATH")
    try:
        model = load_model(checkpoint, device="cpu" if args.device == "auto" else args.device)
    except (FileNotFoundError, ValueError) as err:  # ValueError: e.g. an INT4 model asked onto a GPU
        parser.error(str(err))
    if tokenizer.get_vocab_size() > model.config.padded_vocab_size:
        parser.error(f"{tok_path} has {tokenizer.get_vocab_size()} tokens but the model only "
                     f"{model.config.padded_vocab_size} embeddings: pass the model's own tokenizer as --tokenizer")
    device = args.device
    if device == "auto":  # an INT4 model runs on the CPU even where there is a GPU
        device = "cuda" if torch.cuda.is_available() and not cpu_only(model) else "cpu"
        model.to(device)
    ids = tokenizer.encode(args.prompt).ids
    if not ids:
        parser.error("--prompt encodes to no tokens")
    generator = torch.Generator(device=device).manual_seed(args.seed)
    prompt = torch.tensor([ids] * args.num_samples, device=device)
    out = model.generate(prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                         top_k=args.top_k, top_p=args.top_p, repetition_penalty=args.repetition_penalty,
                         eos_id=eos_id_of(checkpoint, tokenizer), generator=generator)
    for i, row in enumerate(out.tolist()):
        if args.num_samples > 1:
            print(f"--- sample {i + 1}")
        print(args.prompt + tokenizer.decode(row[len(ids):]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
