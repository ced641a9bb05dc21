"""LoRA supervised fine-tuning of a model directory on chat data, through Ray Train +
DeepSpeed (ZeRO-2), with the loss on assistant tokens only.

  python jobs/finetune.py --checkpoint runs/final --data chat.jsonl --output runs/sft
  python jobs/finetune.py --checkpoint runs/final --data chat.jsonl --eval-fraction 0.05 --eval-every 50 --output runs/sft

chat.jsonl: one conversation per line,
  {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}
rendered with the template of mamba_slm.platform.post.chat (plain-text <|role|> markers,
EOS ends each assistant turn). Adapters go on attention q/k/v/o_proj, MLP
gate/up/down_proj and Mamba-2 in_proj/out_proj. Writes:
  <output>/model/        adapters merged into the base weights (save_pretrained; serve it
                         with jobs/serve.py, quantize it with jobs/quantize.py)
  <output>/adapter/      the LoRA adapter alone (peft format)
  <output>/metrics.jsonl, <output>/checkpoints/ (Ray Train; a rerun with the same
                         --output and --name resumes from the last checkpoint)
Ray: joins the cluster in RAY_ADDRESS (as under `ray job submit`), else starts a local one.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python jobs/finetune.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, type=Path, help="base model directory (save_pretrained)")
    p.add_argument("--data", required=True, type=Path, help="chat JSONL file (format above)")
    p.add_argument("--output", required=True, type=Path, help="output directory")
    p.add_argument("--name", default="finetune", help="Ray Train run name (default finetune)")
    p.add_argument("--epochs", type=float, default=3.0, help="passes over the data (default 3)")
    p.add_argument("--max-steps", type=int, help="optimizer steps (overrides --epochs)")
    p.add_argument("--eval-data", type=Path,
                   help="held-out chat JSONL: its loss on assistant tokens is logged as val_loss")
    p.add_argument("--eval-fraction", type=float, default=0.0,
                   help="or hold out this share of --data's conversations (picked with --seed)")
    p.add_argument("--eval-every", type=int, default=0,
                   help="with a held-out set: evaluate every N steps too (default: at the end only)")
    p.add_argument("--lr", type=float, default=2e-4, help="peak learning rate (default 2e-4)")
    p.add_argument("--warmup-steps", type=int, default=0, help="linear warmup steps (default 0)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay on the adapters")
    p.add_argument("--global-batch-size", type=int, default=8, help="conversations per optimizer step")
    p.add_argument("--micro-batch-size", type=int, default=2, help="conversations per worker forward")
    p.add_argument("--max-seq-len", type=int, default=0,
                   help="truncate conversations to this many tokens (default: the model's max_seq_len)")
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--lora-alpha", type=float, default=16.0)
    p.add_argument("--lora-dropout", type=float, default=0.0)
    p.add_argument("--lora-targets", nargs="+", help="subset of the projections to adapt (default: all)")
    p.add_argument("--num-workers", type=int, default=2,
                   help="Ray Train workers (default 2; 0 = run the loop in this process, for debugging)")
    p.add_argument("--cpus-per-worker", type=float, default=1.0)
    p.add_argument("--gpu", action="store_true", help="one GPU per worker (bf16, NCCL)")
    p.add_argument("--checkpoint-every", type=int, default=0, help="checkpoint every N steps (0 = at the end)")
    p.add_argument("--max-failures", type=int, default=0, help="worker failures to recover from")
    p.add_argument("--seed", type=int, default=0)
    return p


def make_job(args, parser):
    from mamba_slm.platform.post.finetune import FinetuneJob, LoraConfig, steps_per_epoch, train_and_eval_examples
    from mamba_slm.platform.post.loading import check_model_dir
    from mamba_slm.platform.train.config import TrainingConfig

    try:
        check_model_dir(args.checkpoint)
    except FileNotFoundError as exc:
        parser.error(f"--checkpoint: {exc}")
    from mamba_slm.platform.post.quantize import is_quantized_dir

    if is_quantized_dir(args.checkpoint):
        parser.error(f"--checkpoint {args.checkpoint} is quantized (jobs/quantize.py): fine-tune the float "
                     "model, then quantize the result")
    if args.eval_every and args.eval_data is None and not args.eval_fraction:
        parser.error("--eval-every needs a held-out set: --eval-data FILE or --eval-fraction F")
    if not args.data.is_file():
        parser.error(f"--data {args.data}: no such file")
    if args.eval_data is not None and not args.eval_data.is_file():
        parser.error(f"--eval-data {args.eval_data}: no such file")
    if args.eval_every < 0:
        parser.error(f"--eval-every {args.eval_every} must be >= 0")
    if (args.output / "model").exists():
        parser.error(f"--output {args.output} already holds a fine-tuned model: pass a new directory")
    if args.num_workers < 0 or args.epochs <= 0 or (args.max_steps is not None and args.max_steps < 1):
        parser.error("--epochs and --max-steps must be positive, --num-workers >= 0")
    lora_kw = {"targets": tuple(args.lora_targets)} if args.lora_targets else {}
    try:
        lora = LoraConfig(rank=args.lora_rank, alpha=args.lora_alpha, dropout=args.lora_dropout, **lora_kw)
        probe = FinetuneJob(str(args.checkpoint.resolve()), str(args.data.resolve()), str(args.output.resolve()),
                            TrainingConfig(seq_len=1, seed=args.seed), lora, args.max_seq_len,
                            eval_data=str(args.eval_data.resolve()) if args.eval_data else "",
                            eval_fraction=args.eval_fraction)
        examples, held_out, _ = train_and_eval_examples(probe)
        steps = args.max_steps or max(1, round(args.epochs * steps_per_epoch(len(examples), args.global_batch_size)))
        training = TrainingConfig(
            name=args.name, max_steps=steps, global_batch_size=args.global_batch_size,
            micro_batch_size=args.micro_batch_size, seq_len=max(len(x) for x, _ in examples + held_out), lr=args.lr,
            min_lr_ratio=0.1, warmup_steps=args.warmup_steps, weight_decay=args.weight_decay,
            zero_stage=2, checkpoint_every=args.checkpoint_every, eval_every=args.eval_every, seed=args.seed,
            spike_factor=0.0)
        training.grad_accum_steps(max(1, args.num_workers))
    except ValueError as exc:
        parser.error(str(exc))
    job = FinetuneJob(**{**probe.to_dict(), "training": training, "lora": lora, "num_workers": args.num_workers,
                         "cpus_per_worker": args.cpus_per_worker, "use_gpu": args.gpu,
                         "max_failures": args.max_failures, "name": args.name})
    return job, (len(examples), len(held_out))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from mamba_slm.platform.extras import missing_extra

    if msg := missing_extra("post", ("peft",), what="LoRA fine-tuning"):
        parser.error(msg)
    job, (n, n_held_out) = make_job(args, parser)
    from mamba_slm.platform.post.finetune import run_finetune

    held = f" ({n_held_out} held out for val_loss)" if n_held_out else ""
    print(f"fine-tuning {job.checkpoint} on {n} conversations{held}: {job.training.max_steps} steps of "
          f"{job.training.global_batch_size}, LoRA r={job.lora.rank} on {', '.join(job.lora.targets)}, "
          f"{job.num_workers} worker(s)")
    model_dir = run_finetune(job)
    print(f"merged model: {model_dir}\nadapter:      {Path(job.output_dir) / 'adapter'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
