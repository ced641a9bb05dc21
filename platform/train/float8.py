"""Float8 training: the blocks' matmuls in float8, everything else as before (torchao).

Hopper and Ada GPUs (compute capability 8.9+: H100, H200, L4, RTX 4090) multiply float8
matrices at twice their bf16 rate. `apply_float8` swaps the blocks' `nn.Linear`s for
torchao's `Float8Linear` with the "tensorwise" recipe (torchtitan's `--model.converters
float8`): inputs and weights cast to e4m3 and output gradients to e5m2, each with one scale
per tensor taken from its absolute maximum at every step (Micikevicius et al. 2022, "FP8
formats for deep learning"). Each converted module's forward is compiled, so that the amax,
scale and cast of an operand fuse into one pass over it; uncompiled, the casts cost more
than the faster matmul saves.

Left in bf16: the vocabulary projection (its chunked cross-entropy runs its own matmuls,
and torchtitan keeps the output layer high-precision too), the embeddings, Mamba-2's SSD
scan and convolution, attention itself, and any linear with a dimension not a multiple of
16 (cuBLAS's float8 kernel needs it). Parameters, optimizer state and checkpoints do not
change (the weights are cast on the fly), so a float8 run resumes from a bf16 checkpoint
and the other way round, and exports the same.

On a CPU the float8 matmuls run emulated (torch's reference `_scaled_mm`, no compile): for
tests only.
"""
from __future__ import annotations

import logging

import torch
import torch.nn as nn

from mamba_slm.model.layers import allow_recompiles
from mamba_slm.platform.extras import missing_extra

log = logging.getLogger(__name__)

MIN_CAPABILITY = (8, 9)
# Markers set on linears by the model; the swapped module must keep them (init scaling).
_MARKERS = ("_is_residual_proj",)


def float8_filter(module: nn.Module, fqn: str) -> bool:
    """Which linears become float8: the blocks' projections whose both dimensions are
    multiples of 16; not the vocabulary projection."""
    return (isinstance(module, nn.Linear) and fqn.startswith("layers.")
            and module.in_features % 16 == 0 and module.out_features % 16 == 0)


def check_float8_device(device: torch.device) -> None:
    """Raise a ValueError naming the card when it has no float8 matmuls."""
    if device.type != "cuda":
        return
    capability = torch.cuda.get_device_capability(device)
    if capability < MIN_CAPABILITY:
        raise ValueError(
            f"float8 training needs a GPU of compute capability 8.9+ (H100, H200, L4, RTX 4090); "
            f"{torch.cuda.get_device_name(device)} has {capability[0]}.{capability[1]}. "
            "Train without --float8 on this card.")


def apply_float8(model: nn.Module, compile_modules: bool | None = None) -> list[str]:
    """Swap the blocks' linears of `model` for float8 ones, in place (see the module
    docstring) -> the names of the swapped modules. `compile_modules` (default: on a GPU)
    compiles each swapped module's forward."""
    if msg := missing_extra("float8", what="float8 training"):
        raise ImportError(msg)
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    device = next(model.parameters()).device
    check_float8_device(device)
    markers = {name: {m: getattr(mod, m) for m in _MARKERS if hasattr(mod, m)}
               for name, mod in model.named_modules() if float8_filter(mod, name)}
    convert_to_float8_training(model, module_filter_fn=float8_filter,
                               config=Float8LinearConfig.from_recipe_name("tensorwise"))
    swapped = []
    for name, mod in model.named_modules():
        if name in markers and type(mod) is not nn.Linear:
            for key, value in markers[name].items():
                setattr(mod, key, value)
            swapped.append(name)
    if compile_modules is None:
        compile_modules = device.type == "cuda"
    if compile_modules and swapped:
        # One compiled function for all of them: the modules are its inputs (inlined nn
        # modules), so each distinct weight shape compiles once (7 in the 1.3B preset),
        # whatever the number of layers. Past dynamo's recompile limit (8 by default) the
        # rest would run uncompiled, slower than bf16: allow one per shape and then some.
        shapes = {(model.get_submodule(n).in_features, model.get_submodule(n).out_features) for n in swapped}
        allow_recompiles(4 * len(shapes) + 8)
        forward = torch.compile(type(model.get_submodule(swapped[0])).forward)
        for name in swapped:
            mod = model.get_submodule(name)
            mod.forward = forward.__get__(mod)
    if device.type == "cpu":
        log.warning("float8 on a CPU runs emulated (no speed-up): for tests only")
    log.info("float8: %d linears swapped (tensorwise scaling%s)", len(swapped),
             ", compiled" if compile_modules else "")
    return swapped
