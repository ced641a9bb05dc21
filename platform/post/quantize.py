"""Weight-only INT8 / INT4 quantization of a `HybridLM` for inference (INT8 on a CPU or a
GPU, INT4 on a CPU).

Every `nn.Linear` inside the blocks (attention q/k/v/o_proj, MLP gate/up/down_proj,
Mamba-2 in_proj/out_proj) is replaced by a quantized linear; embeddings, `lm_head` (tied
to the embeddings in the small presets), norms, the Mamba-2 conv and A_log/D/dt_bias stay
in float32. Activations are not quantized.

- INT8: symmetric, one scale per output channel; matmul by PyTorch's CPU kernel
  `torch._weight_int8pack_mm` (the kernel gpt-fast's int8 path uses); on a GPU, a one-row
  product (batch-1 decoding) is an inductor-compiled GEMV that reads the int8 weight
  (`int8_gemv`), a longer one converts the weight to bf16 first.
- INT4: asymmetric, one scale and zero per `group_size` input channels (gpt-fast /
  tinygemm convention: w = (q - 8) * scale + zero); matmul by
  `torch._weight_int4pack_mm_for_cpu`. The kernel needs output features in multiples
  of 16: odd-sized projections (Mamba-2's in_proj) are zero-padded and the output sliced.

Both kernels take bf16 activations (fp32 activations run 3-6x slower on this CPU), so a
quantized linear computes in bf16 and returns the input's dtype.

Why not torchao or torch.ao: `torch.ao.quantization.quantize_dynamic` is deprecated
(removal announced); torchao 0.18 (PyPI) runs INT8 weight-only on CPU by dequantizing
(no faster than fp32) and has no CPU INT4 layout (its "plain" format needs `mslk`, the
others need CUDA). The two core kernels above are what those libraries dispatch to.

On disk: a model directory like `save_pretrained`'s, with int8 / packed-uint8 weights
plus `.scale` (and `.zero`) tensors in model.safetensors and a "quantization" entry in
config.json; `load_quantized` rebuilds it. `mamba_slm.model.io.load_pretrained` refuses
it (strict load), `mamba_slm.platform.post.loading.load_model_dir` loads either kind.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from mamba_slm.model import HybridLM, ModelConfig
from mamba_slm.model.io import CONFIG_FILE, TOKENIZER_FILE, WEIGHTS_FILE, load_config
from mamba_slm.model.layers import fused_on_gpu

BITS = (8, 4)
COMPUTE_DTYPE = torch.bfloat16


@dataclass
class QuantConfig:
    bits: int = 8
    group_size: int = 32  # INT4 only: input channels sharing one scale/zero

    def __post_init__(self) -> None:
        if self.bits not in BITS:
            raise ValueError(f"QuantConfig.bits={self.bits!r}: expected one of {BITS}")
        if self.group_size not in (32, 64, 128, 256):
            raise ValueError(f"QuantConfig.group_size={self.group_size}: expected 32, 64, 128 or 256 "
                             f"(the INT4 kernel's supported group sizes)")


class Int8Linear(nn.Module):
    """y = x @ (weight * scale[:, None]).T + bias, weight int8 (N, K), scale (N,)."""

    def __init__(self, in_features: int, out_features: int, bias: bool):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scale", torch.empty(out_features, dtype=COMPUTE_DTYPE))
        self.register_buffer("bias", torch.empty(out_features) if bias else None)

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear) -> "Int8Linear":
        w = linear.weight.detach().float()
        # Codes are computed against the scale as stored (bf16), so that dequantizing
        # gives back each weight within half a step.
        scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-8).to(COMPUTE_DTYPE)
        q = cls(linear.in_features, linear.out_features, linear.bias is not None)
        q.weight = torch.round(w / scale.float()[:, None]).clamp(-127, 127).to(torch.int8)
        q.scale = scale
        if linear.bias is not None:
            q.bias = linear.bias.detach().float().clone()
        return q

    @classmethod
    @torch.no_grad()
    def stack_rows(cls, linears: list["Int8Linear"]) -> "Int8Linear":
        """One Int8Linear computing `linears` (bias-free, one input) side by side; their
        weight and scale become views of its own (model/layers.py PackedLinears)."""
        with torch.device("meta"):  # its buffers are set just below
            packed = cls(linears[0].in_features, sum(m.out_features for m in linears), bias=False)
        packed.weight = torch.cat([m.weight for m in linears])
        packed.scale = torch.cat([m.scale for m in linears])
        start = 0
        for m in linears:
            m.weight = packed.weight[start:start + m.out_features]
            m.scale = packed.scale[start:start + m.out_features]
            start += m.out_features
        return packed

    def dequantized(self) -> torch.Tensor:
        return self.weight.float() * self.scale.float()[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # contiguous: torch 2.11's CPU int8 kernel refuses a last dimension with a stride
        x2 = x.reshape(-1, self.in_features).to(COMPUTE_DTYPE).contiguous()
        if not x.is_cuda:
            y = torch._weight_int8pack_mm(x2, self.weight, self.scale)
        elif x2.shape[0] == 1 and not torch.is_grad_enabled():
            y = int8_gemv(x2, self.weight, self.scale)  # a batch-1 decode step
        else:
            y = int8_matmul(x2, self.weight, self.scale)  # prompts: a bf16 weight per call
        y = y.view(*x.shape[:-1], self.out_features).to(x.dtype)
        return y if self.bias is None else y + self.bias.to(x.dtype)


def cpu_only(model: nn.Module) -> bool:
    """INT4 weights: their kernel (torch's int4pack for CPU) has no GPU counterpart here."""
    return any(isinstance(m, Int4Linear) for m in model.modules())


def check_device(model: nn.Module, device: str, path, fix: str) -> None:
    """ValueError when `model` (from `path`) cannot run on `device`; `fix` says how to load it instead."""
    if torch.device(device).type != "cpu" and cpu_only(model):
        raise ValueError(f"{path} is an INT4 model, which runs on a CPU only: {fix}, or quantize with "
                         "--bits 8 for a GPU")


def int8_matmul(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x (M, K) bf16 @ (weight (N, K) int8 * scale (N,)).T, in x's dtype (the scale applied
    in float32, one rounding)."""
    return ((x @ weight.to(x.dtype).t()).float() * scale.float()).to(x.dtype)


@fused_on_gpu(recompiles=64, dynamic=False, options={"coordinate_descent_tuning": True})
def int8_gemv(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """`int8_matmul` of one row on a GPU, compiled per weight shape: inductor lowers a
    one-row matmul to a reduction kernel (tuned by coordinate descent) into which the int8
    -> bf16 conversion fuses, so each weight byte is read once, as int8 (gpt-fast's INT8
    decode). Compiled on first use of a shape, which a CUDA-graph decoder's warm-up step
    does before capture; if compiling fails, it warns once and stays eager."""
    return int8_matmul(x, weight, scale)


class Int4Linear(nn.Module):
    """Group-wise asymmetric INT4. Stored: `weight` uint8 (N_pad, K/2), two 4-bit values
    per byte (low nibble = even column), `scale`/`zero` (N_pad, K/group). The kernel's
    packed layout is built from them at load (`_pack`), so files do not depend on it."""

    def __init__(self, in_features: int, out_features: int, bias: bool, group_size: int):
        super().__init__()
        if in_features % group_size:
            raise ValueError(f"INT4 group_size={group_size} does not divide in_features={in_features}; "
                             f"pick a group size that divides the hidden sizes")
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        n_pad = -(-out_features // 16) * 16
        self.register_buffer("weight", torch.empty(n_pad, in_features // 2, dtype=torch.uint8))
        self.register_buffer("scale", torch.empty(n_pad, in_features // group_size, dtype=COMPUTE_DTYPE))
        self.register_buffer("zero", torch.empty(n_pad, in_features // group_size, dtype=COMPUTE_DTYPE))
        self.register_buffer("bias", torch.empty(out_features) if bias else None)
        self._packed: tuple[torch.Tensor, torch.Tensor] | None = None

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, group_size: int) -> "Int4Linear":
        q = cls(linear.in_features, linear.out_features, linear.bias is not None, group_size)
        n_pad, K = q.weight.shape[0], linear.in_features
        w = F.pad(linear.weight.detach().float(), (0, 0, 0, n_pad - linear.out_features))
        groups = w.view(n_pad, K // group_size, group_size)
        lo, hi = groups.amin(-1), groups.amax(-1)
        scale = ((hi - lo) / 15.0).clamp(min=1e-8)
        zero = lo + 8.0 * scale  # value of code 8, the mid-point (gpt-fast get_group_qparams)
        scale, zero = scale.to(COMPUTE_DTYPE), zero.to(COMPUTE_DTYPE)  # codes against stored values
        codes = torch.round((groups - zero.float()[..., None]) / scale.float()[..., None] + 8.0)
        codes = codes.clamp(0, 15).to(torch.uint8).view(n_pad, K)
        q.weight = codes[:, 0::2] | (codes[:, 1::2] << 4)
        q.scale, q.zero = scale, zero
        if linear.bias is not None:
            q.bias = linear.bias.detach().float().clone()
        return q

    def codes(self) -> torch.Tensor:
        """(N_pad, K) int32 values in [0, 15]."""
        lo, hi = self.weight & 0x0F, self.weight >> 4
        return torch.stack([lo, hi], dim=-1).view(self.weight.shape[0], -1).to(torch.int32)

    def dequantized(self) -> torch.Tensor:
        n_pad, K, g = self.weight.shape[0], self.in_features, self.group_size
        codes = self.codes().float().view(n_pad, K // g, g)
        w = (codes - 8.0) * self.scale.float()[..., None] + self.zero.float()[..., None]
        return w.view(n_pad, K)[: self.out_features]

    def _pack(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._packed is None:
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(self.codes(), 1)
            scales_zeros = torch.stack([self.scale, self.zero], dim=-1).transpose(0, 1).contiguous()
            self._packed = (packed, scales_zeros)  # (K/group, N_pad, 2)
        return self._packed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda:
            raise RuntimeError("INT4 (torch._weight_int4pack_mm_for_cpu) runs on a CPU only; "
                               "quantize with bits=8 for a GPU, or move the model to the CPU")
        packed, scales_zeros = self._pack()
        y = torch._weight_int4pack_mm_for_cpu(x.reshape(-1, self.in_features).to(COMPUTE_DTYPE).contiguous(), packed,
                                              self.group_size, scales_zeros)
        y = y[:, : self.out_features].reshape(*x.shape[:-1], self.out_features).to(x.dtype)
        return y if self.bias is None else y + self.bias.to(x.dtype)


def quantizable_linears(model: HybridLM) -> list[str]:
    """Names of the linears inside the blocks (lm_head and embeddings are kept)."""
    return [name for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and name.startswith("layers.")]


def _make(linear: nn.Linear | None, cfg: QuantConfig, in_f: int = 0, out_f: int = 0, bias: bool = False):
    if linear is not None:
        return Int8Linear.from_linear(linear) if cfg.bits == 8 else Int4Linear.from_linear(linear, cfg.group_size)
    return Int8Linear(in_f, out_f, bias) if cfg.bits == 8 else Int4Linear(in_f, out_f, bias, cfg.group_size)


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, new)


@torch.no_grad()
def quantize_model(model: HybridLM, cfg: QuantConfig) -> HybridLM:
    """Replace the block linears of `model` in place; returns it in eval mode."""
    if cfg.bits == 4:
        for name in quantizable_linears(model):
            k = model.get_submodule(name).in_features
            if k % cfg.group_size:
                raise ValueError(f"INT4 group_size={cfg.group_size} does not divide {name}.in_features={k}; "
                                 f"use --group-size {_largest_group(k)}")
    for name in quantizable_linears(model):
        _replace(model, name, _make(model.get_submodule(name), cfg))
    return model.eval()


def _largest_group(k: int) -> int:
    return max((g for g in (32, 64, 128, 256) if k % g == 0), default=32)


def save_quantized(model: HybridLM, path: str | Path, cfg: QuantConfig,
                   tokenizer_file: str | Path | None = None, metadata: dict | None = None) -> Path:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, str(path / WEIGHTS_FILE), metadata={"format": "pt"})
    quantized = [n for n, m in model.named_modules() if isinstance(m, (Int8Linear, Int4Linear))]
    (path / CONFIG_FILE).write_text(json.dumps(
        {**(metadata or {}), "model": model.config.to_dict(),
         "quantization": {**asdict(cfg), "modules": quantized}}, indent=2, sort_keys=True))
    if tokenizer_file is not None and Path(tokenizer_file).resolve() != (path / TOKENIZER_FILE).resolve():
        shutil.copyfile(tokenizer_file, path / TOKENIZER_FILE)
    return path


def is_quantized_dir(path: str | Path) -> bool:
    config = Path(path) / CONFIG_FILE
    return config.is_file() and "quantization" in json.loads(config.read_text())


def load_quantized(path: str | Path) -> HybridLM:
    """Rebuild a `save_quantized` directory (CPU, eval mode)."""
    path = Path(path)
    meta = json.loads((path / CONFIG_FILE).read_text())
    if "quantization" not in meta:
        raise ValueError(f"{path} is not a quantized model directory (no 'quantization' in {CONFIG_FILE}); "
                         f"load it with mamba_slm.model.io.load_pretrained")
    qinfo = dict(meta["quantization"])
    modules = qinfo.pop("modules")
    cfg, model_cfg = QuantConfig(**qinfo), load_config(path)
    with torch.device("meta"):
        model = HybridLM(model_cfg)
    for name in modules:
        lin = model.get_submodule(name)
        _replace(model, name, _make(None, cfg, lin.in_features, lin.out_features, lin.bias is not None))
    # Copied out of the file's mapping: safetensors places tensors 8-byte aligned, and
    # torch._weight_int8pack_mm's AVX-512 kernel reads its weight with aligned loads (it
    # crashed the process on an AMD EPYC with avx512_bf16, weight at address % 64 == 8).
    # Tensors torch allocates are 64-byte aligned.
    state = {name: t.clone() for name, t in load_file(str(path / WEIGHTS_FILE)).items()}
    if model_cfg.tie_embeddings:
        state["lm_head.weight"] = state["embed_tokens.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    if model_cfg.tie_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    _rebuild_rotary(model, model_cfg)
    return model.eval()


def _rebuild_rotary(model: HybridLM, cfg: ModelConfig) -> None:
    """The rotary inverse frequencies are not saved (as in `mamba_slm.model.io`)."""
    from mamba_slm.model.layers import rope_inv_freq

    for module in model.modules():
        if hasattr(module, "inv_freq") and module.inv_freq.is_meta:
            module.register_buffer("inv_freq", rope_inv_freq(
                module.rotary_dim, cfg.rope_theta, cfg.rope_scaling, cfg.max_seq_len), persistent=False)


def weights_nbytes(model: nn.Module) -> int:
    """Bytes of all parameters and buffers as stored (tied tensors counted once)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total
