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
                         --output and --name resumes from the last checkpoint, and is
                         refused if --checkpoint, --data, --eval-fraction or --lora-* differ)
model/ and adapter/ are fp32 (also after a bf16 --gpu run) and written atomically: a run
that stopped before them (or lost model/) writes them when rerun with the same arguments.
Ray: joins the cluster in RAY_ADDRESS (as under `ray job submit`), else starts a local one.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python jobs/finetune.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, type=Path, help="base model directory (save_pretrained)")
    p.add_argument("--data", required=True, type=Path, help="chat JSONL file (format above)")
    p.add_argument("--output", required=True, type=Path, help="output directory")
    p.add_argument("--name", default="finetune", help="Ray Train run name (default finetune)")
    p.add_argument("--epochs", type=float, default=3.0,
                   help="passes over the training conversations (default 3): ceil(epochs x conversations / "
                        "global batch) steps, so every conversation is seen; the batch is fixed, so the last "
                        "step may take up to global-batch - 1 conversations of the next pass")
    p.add_argument("--max-steps", type=int, help="optimizer steps (overrides --epochs)")
    p.add_argument("--eval-data", type=Path,
                   help="held-out chat JSONL: its loss on assistant tokens is logged as val_loss")
    p.add_argument("--eval-fraction", type=float, default=0.0,
                   help="or hold out this share of --data's distinct conversations (picked by a hash of "
                        "--seed and their content: duplicates stay on one side)")
    p.add_argument("--eval-every", type=int, default=0,
                   help="with a held-out set: evaluate every N steps too (default: at the end only)")
    p.add_argument("--lr", type=float, default=2e-4, help="peak learning rate (default 2e-4)")
    p.add_argument("--warmup-steps", type=int, default=0, help="linear warmup steps (default 0)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay on the adapters")
    p.add_argument("--global-batch-size", type=int, default=8, help="conversations per optimizer step")
    p.add_argument("--micro-batch-size", type=int, default=2, help="conversations per worker forward")
    p.add_argument("--max-seq-len", type=int, default=0,
                   help="truncate conversations to this many tokens, at most the model's max_seq_len "
                        "(default 0: the model's max_seq_len)")
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


def check_numbers(args, parser) -> None:
    """Bad numbers are refused here (exit 2) before anything is loaded."""
    if not (math.isfinite(args.epochs) and args.epochs > 0):
        parser.error(f"--epochs {args.epochs}: must be a positive finite number of passes")
    if args.max_steps is not None and args.max_steps < 1:
        parser.error(f"--max-steps {args.max_steps}: must be >= 1")
    for flag in ("global_batch_size", "micro_batch_size"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} {getattr(args, flag)}: must be >= 1")
    if args.num_workers < 0 or args.max_failures < 0 or args.eval_every < 0:
        parser.error("--num-workers, --max-failures and --eval-every must be >= 0")
    if not (math.isfinite(args.cpus_per_worker) and args.cpus_per_worker > 0):
        parser.error(f"--cpus-per-worker {args.cpus_per_worker}: must be a positive number")
    if not (math.isfinite(args.lr) and math.isfinite(args.weight_decay)):
        parser.error("--lr and --weight-decay must be finite numbers")
    if args.max_seq_len < 0:
        parser.error(f"--max-seq-len {args.max_seq_len}: must be >= 0 (0 = the model's max_seq_len)")


def check_output(job, parser) -> None:
    """A finished fine-tune is never overwritten; a rerun resumes only the same fine-tune."""
    from mamba_slm.model.io import CONFIG_FILE, WEIGHTS_FILE
    from mamba_slm.platform.post.finetune import newest_checkpoint, resume_mismatch

    model = Path(job.output_dir) / "model"
    if (model / WEIGHTS_FILE).is_file() and (model / CONFIG_FILE).is_file():
        parser.error(f"--output {job.output_dir} already holds a fine-tuned model: pass a new directory")
    if model.exists():  # not written by this version, which renames a complete model/ into place
        parser.error(f"--output: {model} is incomplete (an interrupted save): remove it and rerun to write "
                     "it again from the last checkpoint")
    newest = newest_checkpoint(job)
    if newest is not None and (why := resume_mismatch(newest[2], job)):
        parser.error(f"--output {job.output_dir} --name {job.name} holds checkpoint {newest[0].name} of a "
                     f"different fine-tune, which a rerun resumes (its frozen base and adapters included); "
                     f"differs in {why}. Rerun with its settings to resume it, or pass a new --output to "
                     "start a new fine-tune")


def make_job(args, parser):
    """-> (job, examples: the training and held-out conversations)."""
    from mamba_slm.model.io import load_config
    from mamba_slm.platform.post.finetune import FinetuneJob, LoraConfig, steps_for_epochs, train_and_eval_examples
    from mamba_slm.platform.post.loading import check_model_dir
    from mamba_slm.platform.train.config import TrainingConfig

    check_numbers(args, parser)
    try:
        check_model_dir(args.checkpoint)
    except FileNotFoundError as exc:
        parser.error(f"--checkpoint: {exc}")
    from mamba_slm.platform.post.quantize import is_quantized_dir

    if is_quantized_dir(args.checkpoint):
        parser.error(f"--checkpoint {args.checkpoint} is quantized (jobs/quantize.py): fine-tune the float "
                     "model, then quantize the result")
    context = load_config(args.checkpoint).max_seq_len
    if args.max_seq_len > context:
        parser.error(f"--max-seq-len {args.max_seq_len} exceeds the model's context of {context} tokens "
                     f"(max_seq_len in {args.checkpoint}/config.json): pass at most {context}, or 0")
    if args.eval_every and args.eval_data is None and not args.eval_fraction:
        parser.error("--eval-every needs a held-out set: --eval-data FILE or --eval-fraction F")
    if not args.data.is_file():
        parser.error(f"--data {args.data}: no such file")
    if args.eval_data is not None and not args.eval_data.is_file():
        parser.error(f"--eval-data {args.eval_data}: no such file")
    lora_kw = {"targets": tuple(args.lora_targets)} if args.lora_targets else {}
    try:
        lora = LoraConfig(rank=args.lora_rank, alpha=args.lora_alpha, dropout=args.lora_dropout, **lora_kw)
        probe = FinetuneJob(str(args.checkpoint.resolve()), str(args.data.resolve()), str(args.output.resolve()),
                            TrainingConfig(seq_len=1, seed=args.seed), lora, args.max_seq_len,
                            eval_data=str(args.eval_data.resolve()) if args.eval_data else "",
                            eval_fraction=args.eval_fraction, name=args.name)
        examples = train_and_eval_examples(probe)
        steps = args.max_steps or steps_for_epochs(args.epochs, len(examples.train), args.global_batch_size)
        training = TrainingConfig(
            name=args.name, max_steps=steps, global_batch_size=args.global_batch_size,
            micro_batch_size=args.micro_batch_size,
            seq_len=max(len(x) for x, _ in examples.train + examples.held_out), lr=args.lr,
            min_lr_ratio=0.1, warmup_steps=args.warmup_steps, weight_decay=args.weight_decay,
            zero_stage=2, checkpoint_every=args.checkpoint_every, eval_every=args.eval_every, seed=args.seed,
            spike_factor=0.0)
        training.grad_accum_steps(max(1, args.num_workers))
    except (ValueError, OverflowError) as exc:
        parser.error(str(exc))
    job = FinetuneJob(**{**probe.to_dict(), "training": training, "lora": lora, "num_workers": args.num_workers,
                         "cpus_per_worker": args.cpus_per_worker, "use_gpu": args.gpu,
                         "max_failures": args.max_failures})
    check_output(job, parser)
    return job, examples


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from mamba_slm.platform.extras import missing_extra

    if msg := missing_extra("post", ("peft",), what="LoRA fine-tuning"):
        parser.error(msg)
    job, examples = make_job(args, parser)
    from mamba_slm.platform.post.finetune import FinetuneIncomplete, run_finetune

    n, t = len(examples.train), job.training
    held = f" ({len(examples.held_out)} held out for val_loss)" if examples.held_out else ""
    print(f"fine-tuning {job.checkpoint} on {n} conversations{held}: {t.max_steps} steps of "
          f"{t.global_batch_size} (= {t.max_steps * t.global_batch_size / n:.2f} passes), LoRA r={job.lora.rank} "
          f"on {', '.join(job.lora.targets)}, {job.num_workers} worker(s)")
    if examples.shared:
        print(f"warning: {examples.shared} of the {len(examples.held_out)} --eval-data conversations are also in "
              f"--data: val_loss is not a held-out loss for them (drop them from one file, or use "
              "--eval-fraction)", file=sys.stderr)
    try:
        model_dir = run_finetune(job)
    except FinetuneIncomplete as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"merged model: {model_dir}\nadapter:      {Path(job.output_dir) / 'adapter'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
