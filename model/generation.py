"""Autoregressive sampling with a static inference cache and CUDA-graph decoding.

The prompt runs once through the full (chunked) path, filling the Mamba-2 conv/SSM states
and the attention KV caches; each new token then costs one recurrent step per Mamba-2
layer and one cached attention read per attention layer.

At batch 1 a decode step is hundreds of small kernels (24 layers of projections, norms,
the conv/SSM update, rotary, attention), so eager PyTorch is bound by the CPU launching
them, not by the GPU reading the weights. Because the cache is static (fixed buffers, the
position a device tensor: `InferenceCache`), one step -- embedding, every layer, final
norm, lm_head -- is captured once into a `torch.cuda.CUDAGraph` and replayed per token
with the new token copied into a fixed input buffer (the approach of mamba_ssm's
`utils/generation.py` and gpt-fast). Sampling stays outside the graph (it reads the
growing sequence for the repetition penalty). On a CPU the same step runs eagerly.
"""
from __future__ import annotations

import logging
import math
import weakref
from collections import OrderedDict

import torch

from . import fused_decode
from .attention import Attention

log = logging.getLogger(__name__)

# Graph decoders are kept per model and reused by later calls of the same shape (mamba_ssm
# keeps its `_decoding_cache` likewise): the GRAPH_DECODERS_PER_MODEL used last, so that a
# server alternating between a few request lengths does not capture a graph per request;
# weak keys, so they go when the model goes.
_GRAPH_DECODERS: "weakref.WeakKeyDictionary[torch.nn.Module, OrderedDict[tuple, Decoder]]" = \
    weakref.WeakKeyDictionary()
GRAPH_DECODERS_PER_MODEL = 4
MAX_LEN_BUCKET = 256  # generate() sizes caches up to a multiple of this
# Prompts of up to PREFILL_GRAPH_MAX_LEN tokens (all rows together) run as a CUDA graph of the
# next power of two (at least PREFILL_GRAPH_MIN_LEN), right-padded: eager, a short prompt is
# bound by the host launching its ~800 kernels (52 ms for 128 tokens of the 1.3B preset on an
# H200, for ~3.5 ms of GPU work); longer prompts give the GPU enough work to hide the launches,
# and would pin more activation memory per graph.
PREFILL_GRAPH_MIN_LEN, PREFILL_GRAPH_MAX_LEN = 16, 1024
# The smallest positive temperature, top_p and repetition_penalty that sample: float32 logits
# divided by a smaller one overflow to inf (a smaller top_p rounds to 0), and sampling fails.
MIN_SAMPLING_PARAM = 1e-6


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's penalty (Keskar et al. 2019): divide positive logits of seen tokens by
    `penalty`, multiply negative ones. logits (B, V), seen (B, S) token ids."""
    if penalty == 1.0:
        return logits
    picked = logits.gather(1, seen)
    picked = torch.where(picked > 0, picked / penalty, picked * penalty)
    return logits.scatter(1, seen, picked)


def filter_top_k_top_p(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Keep the k most likely tokens and the smallest set whose mass reaches top_p
    (nucleus sampling, Holtzman et al. 2020); the rest get -inf."""
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= top_p  # mass before this token already enough
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(1, order, sorted_logits)
    return logits


def sample_next(logits: torch.Tensor, seen: torch.Tensor, temperature: float = 1.0, top_k: int = 0,
                top_p: float = 1.0, repetition_penalty: float = 1.0,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """logits (B, V) -> next ids (B,). temperature 0 is greedy."""
    logits = apply_repetition_penalty(logits.float(), seen, repetition_penalty)
    if temperature <= 0:
        return logits.argmax(-1)
    logits = filter_top_k_top_p(logits / temperature, top_k, top_p)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


def resolve_cuda_graphs(requested: bool | None, device: torch.device) -> bool:
    """None = on when the model is on a CUDA device; True elsewhere is an error."""
    if requested is None:
        return device.type == "cuda"
    if requested and device.type != "cuda":
        raise ValueError(f"cuda_graphs=True needs the model on a CUDA device (it is on {device}); "
                         "pass cuda_graphs=None or False")
    return bool(requested)


class Decoder:
    """Decodes `batch` rows of up to `max_len` tokens: `prefill(prompt)` once, then
    `step(tokens)` per new token; both return the next-token logits (B, vocab).

    With `cuda_graphs`, the step is captured at construction and replayed: the logits it
    returns live in the graph's output buffer and are overwritten by the next step, so
    read them (sample) before calling `step` again. Holds only a weak reference to the
    model; the graph reads the parameters in place, so in-place weight updates are seen.
    """

    def __init__(self, model, batch: int, max_len: int, cuda_graphs: bool | None = None):
        device = model.lm_head.weight.device
        if device.type == "cuda":
            model.pack_for_decoding()
        self._model = weakref.ref(model)
        self.vocab = model.config.vocab_size
        self.cache = model.new_cache(batch, max_len)
        with torch.no_grad():  # (packed weights read as None while autograd records)
            # one row on a GPU: the PDL kernel chain of model/fused_decode.py
            self.fused = fused_decode.fusable(model, batch, device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.key: tuple | None = None  # what `graph_decoder` reuses it for
        self._prefill_graphs: dict[int, tuple | None] = {}  # padded length -> (graph, ids, valid_len, logits)
        self._prefill_pool = None
        if resolve_cuda_graphs(cuda_graphs, device):
            self._capture(batch, device)

    @property
    def model(self):
        return self._model()

    def _forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.fused and ids.shape[1] == 1:
            return fused_decode.decode_step(self.model, ids, self.cache)[:, -1, :self.vocab]
        return self.model(ids, cache=self.cache).logits[:, -1, :self.vocab]

    @torch.no_grad()
    def _capture(self, batch: int, device: torch.device) -> None:
        self._token = torch.zeros(batch, 1, dtype=torch.long, device=device)
        # Warm up on a side stream first (torch.cuda.graphs docs): Triton compiles and
        # autotunes, cuBLAS makes its workspaces, none of which may happen during capture.
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(2):
                self._forward(self._token)
                self.cache.reset()
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self._logits = self._forward(self._token)
        self.cache.reset()  # capture advanced the host-side count; the device work did not run

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Empty the cache and run the prompt (B, T) through the full path. A graph decoder
        replays a captured graph of the prompt right-padded to the next power of two
        (captured on first use, while B x that length is at most PREFILL_GRAPH_MAX_LEN; if a
        capture fails, that length runs eagerly with a warning), else runs it eagerly. As
        with `step`, a graph's logits are its output buffer: read them before the next call."""
        B, T = input_ids.shape
        self.cache.reset()
        padded = max(PREFILL_GRAPH_MIN_LEN, 1 << (T - 1).bit_length())
        if self.graph is None or B * padded > PREFILL_GRAPH_MAX_LEN or padded > self.cache.max_len:
            return self._prefill_eager(input_ids)
        if padded not in self._prefill_graphs:
            try:
                self._prefill_graphs[padded] = self._capture_prefill(B, padded, input_ids.device)
            except Exception as exc:  # noqa: BLE001 - an optimisation: the eager prompt still works
                log.warning("decode: capturing the prompt graph of %d tokens failed (%r); prompts of that "
                            "length run eagerly", padded, exc)
                self._prefill_graphs[padded] = None
        if self._prefill_graphs[padded] is None:
            return self._prefill_eager(input_ids)
        graph, ids, valid, logits = self._prefill_graphs[padded]
        ids[:, :T].copy_(input_ids)
        ids[:, T:].zero_()  # any token id: padding changes no state
        valid.fill_(T)
        graph.replay()
        self.cache.seqlen = T
        return logits

    def _prefill_eager(self, input_ids: torch.Tensor) -> torch.Tensor:
        T = input_ids.shape[1]
        # valid_len = T: logits of the last token only; a one-token prompt is a plain step
        valid = None if T == 1 else torch.full((1,), T, dtype=torch.long, device=input_ids.device)
        logits = self.model(input_ids, cache=self.cache, valid_len=valid).logits[:, -1, :self.vocab]
        self.cache.seqlen = T
        return logits

    def _capture_prefill(self, batch: int, length: int, device: torch.device) -> tuple:
        ids = torch.zeros(batch, length, dtype=torch.long, device=device)
        valid = torch.full((1,), length, dtype=torch.long, device=device)
        side = torch.cuda.Stream(device)  # warm-up off the capture, as in _capture
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(2):
                self.cache.reset()
                self.model(ids, cache=self.cache, valid_len=valid)
        torch.cuda.current_stream(device).wait_stream(side)
        self.cache.reset()
        graph = torch.cuda.CUDAGraph()
        if self._prefill_pool is None:
            self._prefill_pool = torch.cuda.graph_pool_handle()
        # One memory pool for the decoder's prompt graphs: they never run at once, so their
        # activations can share memory (each output stays alive, so none is reused).
        with torch.cuda.graph(graph, pool=self._prefill_pool):
            logits = self.model(ids, cache=self.cache, valid_len=valid).logits[:, -1, :self.vocab]
        self.cache.reset()
        log.info("decode: captured a CUDA graph of prompts padded to %d tokens", length)
        return graph, ids, valid, logits

    @torch.no_grad()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B,) -> logits (B, vocab) for the position after them."""
        if self.graph is None:
            return self._forward(tokens[:, None])
        self.cache.check_room(1)
        self._token.copy_(tokens[:, None])
        self.graph.replay()  # advances the cache's device offset inside the graph
        self.cache.seqlen += 1
        return self._logits


def graph_decoder(model, batch: int, max_len: int) -> Decoder:
    """The model's CUDA-graph decoder for this shape, captured on first use and reused
    while the batch, cache length, autocast and the storage of parameters and buffers stay
    the same. The model keeps the GRAPH_DECODERS_PER_MODEL used last; those captured on
    other weights (moved, reloaded) are freed at once."""
    model.pack_for_decoding()  # before the key: packing moves the weights once
    weights = tuple(t.data_ptr() for t in (*model.parameters(), *model.buffers()))  # INT8 weights are buffers
    key = (batch, max_len, torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda"),
           getattr(model, "fused_decode", True), weights)
    decoders = _GRAPH_DECODERS.setdefault(model, OrderedDict())
    for stale in [k for k in decoders if k[-1] != weights]:
        del decoders[stale]
    if key in decoders:
        decoders.move_to_end(key)
        return decoders[key]
    while len(decoders) >= GRAPH_DECODERS_PER_MODEL:
        decoders.popitem(last=False)  # free the least recently used graph and cache first
    decoder = Decoder(model, batch, max_len, cuda_graphs=True)
    decoder.key = key
    decoders[key] = decoder
    log.info("decode: captured a CUDA graph for batch %d, max_len %d", batch, max_len)
    return decoder


def cache_len(model, total_len: int, cuda_graphs: bool) -> int:
    """The cache length a decoder for `total_len` tokens gets: a multiple of MAX_LEN_BUCKET,
    so that nearby lengths share one captured graph (eager decoding uses the same size, so
    that both run attention over the same cache shape). A graph decoder whose attention reads
    only the filled positions (the GPU kernel; a step costs the same at 256 or 8,192) gets
    the next power of two instead: a handful of graphs then serve every length."""
    rounded = math.ceil(total_len / MAX_LEN_BUCKET) * MAX_LEN_BUCKET
    device = model.lm_head.weight.device
    if cuda_graphs and all(m.reads_filled_cache_only(device) for m in model.modules() if isinstance(m, Attention)):
        return max(MAX_LEN_BUCKET, 1 << (total_len - 1).bit_length())
    return rounded


def make_decoder(model, batch: int, total_len: int, cuda_graphs: bool | None = None) -> Decoder:
    """A decoder for prompts plus new tokens of up to `total_len`: the model's reusable
    CUDA-graph decoder when `cuda_graphs` resolves on (auto: on a CUDA device; a failed
    capture then falls back to eager decoding with a warning), else an eager one."""
    if resolve_cuda_graphs(cuda_graphs, model.lm_head.weight.device):
        try:
            return graph_decoder(model, batch, cache_len(model, total_len, True))
        except Exception as exc:  # noqa: BLE001 - auto mode keeps working on an odd setup
            if cuda_graphs:
                raise
            log.warning("decode: CUDA graph capture failed (%r); decoding eagerly "
                        "(cuda_graphs=False skips the attempt, True makes it an error)", exc)
    return Decoder(model, batch, cache_len(model, total_len, False), cuda_graphs=False)


@torch.no_grad()
def generate(model, input_ids: torch.Tensor, max_new_tokens: int = 32, temperature: float = 1.0,
             top_k: int = 0, top_p: float = 1.0, repetition_penalty: float = 1.0,
             eos_id: int | None = None, generator: torch.Generator | None = None,
             cuda_graphs: bool | None = None) -> torch.Tensor:
    """input_ids (B, T) -> (B, T + new) ids. Rows that emit `eos_id` keep emitting it; the
    result ends at the step where every row has emitted it.

    cuda_graphs: replay one captured CUDA graph per token. None (auto) = on a CUDA device,
    decoding eagerly with a warning if the capture fails; True = required.
    """
    B, T = input_ids.shape
    decoder = make_decoder(model, B, T + max_new_tokens, cuda_graphs)
    check_every = 1 if decoder.graph is None else 16  # an all-done check syncs the host
    out = torch.empty(B, T + max_new_tokens, dtype=input_ids.dtype, device=input_ids.device)
    out[:, :T] = input_ids
    done = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
    logits = decoder.prefill(input_ids)
    n = T
    for i in range(max_new_tokens):
        nxt = sample_next(logits, out[:, :n], temperature, top_k, top_p, repetition_penalty, generator)
        if eos_id is not None:
            nxt = nxt.masked_fill(done, eos_id)
            done |= nxt == eos_id
        out[:, n] = nxt
        n += 1
        last = i + 1 == max_new_tokens
        if eos_id is not None and ((i + 1) % check_every == 0 or last) and bool(done.all()):
            # Cut after the first step at which every row had emitted EOS.
            all_eos = (out[:, T:n] == eos_id).all(0)
            n = T + int(all_eos.int().argmax()) + 1
            break
        if not last:
            logits = decoder.step(nxt)
    return out[:, :n]
