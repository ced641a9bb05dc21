"""ONNX export of a `HybridLM`'s full-sequence forward, checked with onnxruntime.

What is exported: `logits = model(input_ids)[..., :vocab_size]` for input_ids
(batch, seq) int64 -> logits (batch, seq, vocab) float32, through the plain PyTorch
reference path (chunked SSD in einsum/cumsum/masked ops, SDPA attention with GQA), with
the torch.export-based exporter (`torch.onnx.export(..., dynamo=True)`). The TorchScript
exporter cannot convert SDPA with `enable_gqa=True`.

Supported:
- any sequence length that is a multiple of the Mamba-2 chunk size (`mamba_chunk_size`,
  32 for tiny, 256 for the 8K presets), up to `max_chunks` chunks; `OnnxLM.logits`
  right-pads other lengths with EOS and cuts the padding off (padding on the right never
  changes the logits of earlier, causal positions);
- batch 1 by default (`OnnxLM` runs larger batches row by row), or a dynamic batch with
  `dynamic_batch=True`: torch.export's symbolic shape reasoning over the chunked SSD then
  takes ~3x longer (minutes for deep models on a CPU);
- RoPE scaling: baked into the graph from the config at export time.

Not supported:
- decoding with state: the Mamba-2 conv/SSM states and the attention KV cache
  (`InferenceCache`) are not graph inputs/outputs, so generation with the ONNX model
  re-runs the whole prefix for every new token (O(T^2));
- packed documents (`seq_idx`): one document per row;
- the GPU kernels (mamba-ssm, flash-attn): export runs on the CPU reference path;
- quantized models (`platform.post.quantize`): their CPU kernels have no ONNX operator.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from mamba_slm.model import HybridLM

log = logging.getLogger(__name__)


class LogitsOnly(nn.Module):
    """The exported graph: input_ids (B, T) -> logits over the real vocabulary (B, T, V)."""

    def __init__(self, model: HybridLM):
        super().__init__()
        self.model = model
        self.vocab_size = model.config.vocab_size

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids).logits[..., : self.vocab_size]


def _check_exportable(model: HybridLM) -> None:
    if next(model.parameters()).device.type != "cpu":
        raise ValueError("export the model from the CPU (load_pretrained(dir, device='cpu')): the GPU "
                         "kernels have no ONNX form; the CPU runs the reference path")
    if model.config.ssm_path == "kernel" or model.config.attn_impl == "flash":
        raise ValueError("ssm_path='kernel' / attn_impl='flash' cannot be exported; load the model with "
                         "ssm_path='reference', attn_impl='sdpa'")
    from .quantize import Int4Linear, Int8Linear

    if any(isinstance(m, (Int8Linear, Int4Linear)) for m in model.modules()):
        raise ValueError("quantized models cannot be exported to ONNX; export the float model directory")


def export_onnx(model: HybridLM, path: str | Path, dynamic_batch: bool = False,
                max_chunks: int | None = None) -> Path:
    """Write `path` (.onnx; weights beside it as external data when over 2 GB).

    Sequence length is dynamic in multiples of the chunk size, up to `max_chunks` chunks
    (default: 4x max_seq_len); batch is 1, or dynamic with `dynamic_batch`."""
    _check_exportable(model)
    cfg = model.config
    chunk = cfg.mamba_chunk_size
    max_chunks = max_chunks or max(2, 4 * cfg.max_seq_len // chunk)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    example = torch.zeros(2 if dynamic_batch else 1, 2 * chunk, dtype=torch.long)
    # seq = chunk * n: the reference SSD pads to whole chunks, and a length the exporter
    # knows to be a multiple needs no data-dependent branch on the padding.
    dims = {1: torch.export.Dim("chunks", min=1, max=max_chunks) * chunk}
    if dynamic_batch:
        dims[0] = torch.export.Dim("batch", min=1, max=1024)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            program = torch.onnx.export(LogitsOnly(model), (example,), dynamo=True, input_names=["input_ids"],
                                        output_names=["logits"], dynamic_shapes={"input_ids": dims},
                                        optimize=True, verbose=False)
        program.save(str(path), external_data=_nbytes(model) > 1.5 * 2**30)
    finally:
        model.train(was_training)
    log.info("wrote %s", path)
    return path


def _nbytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


class OnnxLM:
    """onnxruntime session around an exported model; pads lengths to whole chunks."""

    def __init__(self, path: str | Path, chunk_size: int, pad_id: int = 0, threads: int | None = None):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.chunk_size, self.pad_id = chunk_size, pad_id
        self.fixed_batch = self.session.get_inputs()[0].shape[0] == 1

    def logits(self, input_ids: np.ndarray) -> np.ndarray:
        """input_ids (B, T) int -> (B, T, V) float32."""
        ids = np.asarray(input_ids, dtype=np.int64)
        T = ids.shape[1]
        pad = (-T) % self.chunk_size
        if pad:
            ids = np.pad(ids, ((0, 0), (0, pad)), constant_values=self.pad_id)
        if self.fixed_batch:
            rows = [self.session.run(["logits"], {"input_ids": row[None]})[0] for row in ids]
            return np.concatenate(rows)[:, :T]
        return self.session.run(["logits"], {"input_ids": ids})[0][:, :T]


@torch.no_grad()
def max_logit_diff(model: HybridLM, onnx_model: OnnxLM, shapes: list[tuple[int, int]], seed: int = 0) -> float:
    """Largest |PyTorch - onnxruntime| logit over random inputs of the given (B, T) shapes."""
    gen = torch.Generator().manual_seed(seed)
    worst = 0.0
    for b, t in shapes:
        ids = torch.randint(0, model.config.vocab_size, (b, t), generator=gen)
        ref = model(ids).logits[..., : model.config.vocab_size].numpy()
        worst = max(worst, float(np.abs(onnx_model.logits(ids.numpy()) - ref).max()))
    return worst
