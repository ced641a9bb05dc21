"""Command line of `jobs/pretrain.py`: one flag per config field, preset + overrides.

Every field of TrainingConfig, DataConfig and RunConfig is a flag, spelled with dashes or
underscores (`--max-steps` / `--max_steps`, so the seed's documented commands work);
booleans also have a `--no-` form. Flags left out keep the value of the chosen
`--training-config` preset. A few fields have their historical names: `--size`
(`--model-size`, `--model_size`), `--data-path`, `--training-config`.
"""
from __future__ import annotations

import argparse
import dataclasses
import typing

from .config import TRAINING_PRESETS, DataConfig, RunConfig, TrainingConfig

# field -> flag names, where the flag is not simply the field name
ALIASES = {
    ("training", "model_size"): ["size", "model-size", "model_size"],
    ("data", "path"): ["data-path", "data_path"],
    ("data", "split"): ["data-split", "data_split"],
}
SKIP = {("training", "name")}  # set by --training-config
GROUPS = (("training", TrainingConfig, "optimisation (defaults: the --training-config preset)"),
          ("data", DataConfig, "data"),
          ("run", RunConfig, "run: where and on what"))

EXAMPLES = """
examples:
  python jobs/pretrain.py                                   # tiny model, demo corpus, 2 CPU workers
  python jobs/pretrain.py --print-configs                   # the training presets
  python jobs/pretrain.py --size 1.3B --training-config small_scale --data-path /data/curated
  python jobs/pretrain.py --training-config medium_scale --zero-stage 3 --storage-path s3://bucket/runs
  ray job submit --address http://HEAD:8265 --working-dir . -- python jobs/pretrain.py --size 6.7B \\
      --training-config large_scale --data-path /data/curated --storage-path s3://bucket/runs
A run with the same --name and storage path resumes from its latest checkpoint.
"""


def _flags(group: str, name: str) -> list[str]:
    names = ALIASES.get((group, name), [name.replace("_", "-"), name])
    return ["--" + n for n in dict.fromkeys(names)]


def _dest(group: str, name: str) -> str:
    return f"{group}__{name}"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python jobs/pretrain.py",
        usage="%(prog)s [--training-config PRESET] [--size SIZE] [--data-path DIR] [--FIELD VALUE ...]",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Pretrain a hybrid Mamba-2/attention LM on Ray Train + DeepSpeed ZeRO-2/3.",
        epilog=EXAMPLES)
    p.add_argument("--training-config", "--training_config", default="quick_test",
                   choices=sorted(TRAINING_PRESETS), help="training preset (default quick_test)")
    p.add_argument("--print-configs", "--print_configs", action="store_true",
                   help="print the training presets and exit")
    p.add_argument("--layout-from", "--layout_from", default="", metavar="SWEEP_DIR",
                   help="use the best layer layout of a sweep (jobs/tune_sweep.py; its "
                        "best_layout.json), re-derived for this model's depth")
    for group, cls, title in GROUPS:
        g = p.add_argument_group(title)
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if (group, f.name) in SKIP:
                continue
            kind = hints[f.name]
            help_text = f.metadata.get("help", "")
            kwargs: dict = {"dest": _dest(group, f.name), "default": None, "help": help_text}
            if kind is bool:
                kwargs["action"] = argparse.BooleanOptionalAction
            else:
                kwargs["type"] = kind
                kwargs["metavar"] = {int: "N", float: "X", str: "TEXT"}.get(kind, "V")
            if f.name == "checkpoint_every":
                kwargs.update(type=checkpoint_every_arg, metavar="N|auto")
            if f.name == "zero_stage":
                kwargs["choices"] = (2, 3)
            g.add_argument(*_flags(group, f.name), **kwargs)
    return p


def checkpoint_every_arg(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give a number of steps or 'auto'") from None


def configs_from_args(args: argparse.Namespace) -> tuple[TrainingConfig, DataConfig, RunConfig]:
    """Preset values, then every flag that was given. Raises ValueError (from the
    configs' checks) naming the field that is wrong; the checks across configs
    (config.check_run_fits) run when `launcher.resolve_job` builds the JobSpec."""
    preset = TRAINING_PRESETS[args.training_config]
    given = {group: {} for group, _, _ in GROUPS}
    for key, value in vars(args).items():
        if "__" in key and value is not None:
            group, name = key.split("__", 1)
            given[group][name] = value
    training = TrainingConfig.from_name(args.training_config, **given["training"])
    data = DataConfig(**given["data"])
    run = RunConfig(**{**preset["run"], **given["run"]})
    return training, data, run


def model_overrides_from_args(args: argparse.Namespace, training: TrainingConfig) -> dict:
    """ModelConfig overrides asked for by flags: the sweep layout of `--layout-from`."""
    if not args.layout_from:
        return {}
    from mamba_slm.tune.layout import apply_layout

    return apply_layout({}, args.layout_from, training.model_size)
