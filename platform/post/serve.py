"""HTTP generation endpoint: a FastAPI app served by uvicorn (`jobs/serve.py`).

    GET  /health    -> {"status": "ok", "model": {...config summary}, "quantized": bool,
                        "max_context": tokens}
    POST /generate  {"prompt": str} or {"messages": [{"role", "content"}, ...]}
                    + max_new_tokens (default 64, or what is left of the context),
                    temperature (0 = greedy), top_k, top_p, repetition_penalty,
                    seed (0 <= seed < 2**63), stream
        stream=false -> {"text", "token_ids", "finish_reason": "eos" | "length", "prompt_tokens"}
        stream=true  -> text/event-stream (Server-Sent Events), one event per generated
                        token `data: {"text": "...", "token_id": n}` (text may be "" while a
                        multi-byte character is incomplete), then
                        `data: {"done": true, "text": "...", "finish_reason": ..., "completion_tokens": n}`
                        whose text is what the token events held back (an incomplete
                        character at the end; usually ""): the texts of all events add up
                        to the text of stream=false.
    A request with unknown fields, non-finite numbers, or prompt + max_new_tokens over the
    context (the model's max_seq_len unless the server is given another) is a 422 that says
    what to change.

`messages` are rendered with the fine-tuning chat template (`platform.post.chat`), so a
model from jobs/finetune.py answers in the format it was trained on.

Decoding uses the model's inference cache (one recurrent Mamba-2 step and one cached
attention read per token). One request runs at a time (a lock around the model): a CPU
serves one sequence fastest with all its cores. Scale out with more replicas. A stream
holds the lock only while it runs: a client that leaves ends its generation at the next
token.
"""
from __future__ import annotations

import json
import math
import threading
from typing import AsyncIterator, Iterator

import torch
from fastapi import FastAPI, HTTPException, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from starlette.concurrency import run_in_threadpool

from mamba_slm.model.generation import MIN_SAMPLING_PARAM, make_decoder, sample_next

from .chat import prompt_ids, validate_messages
from .loading import LoadedModel


DEFAULT_MAX_NEW_TOKENS = 64


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: str
    content: str


class GenerateRequest(BaseModel):
    # A misspelt field ("max_tokens", "temp") is a 422 naming it, not silently the default;
    # NaN and Infinity (which Python's json accepts) are 422s, not a 500 or random text.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    prompt: str | None = None
    messages: list[Message] | None = None
    max_new_tokens: int | None = Field(None, ge=1)  # None: 64, or less where the context ends
    temperature: float = Field(0.8, ge=0.0)
    top_k: int = Field(0, ge=0)
    top_p: float = Field(1.0, ge=MIN_SAMPLING_PARAM, le=1.0)
    repetition_penalty: float = Field(1.0, ge=MIN_SAMPLING_PARAM)
    seed: int | None = Field(None, ge=0, lt=2**63)  # what torch.Generator.manual_seed takes
    stream: bool = False

    @field_validator("temperature")
    @classmethod
    def greedy_or_sampling(cls, value: float) -> float:
        if 0 < value < MIN_SAMPLING_PARAM:
            raise ValueError(f"temperature {value:g} is too small to sample with: give 0 for greedy decoding "
                             f"or at least {MIN_SAMPLING_PARAM:g}")
        return value

    @model_validator(mode="after")
    def one_input(self) -> "GenerateRequest":
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of 'prompt' (text to continue) or 'messages' (a chat)")
        return self


@torch.no_grad()
def stream_token_ids(model, ids: list[int], max_new_tokens: int, eos_id: int, temperature: float,
                     top_k: int, top_p: float, repetition_penalty: float,
                     generator: torch.Generator | None) -> Iterator[int]:
    """Yield sampled ids one at a time (the loop of `mamba_slm.model.generation.generate`,
    as a generator, on the model's device: a replayed CUDA graph per token on a GPU);
    stops after EOS (yielded) or `max_new_tokens`. Not reentrant: the app holds a lock."""
    device = model.lm_head.weight.device
    seen = torch.tensor([ids], dtype=torch.long, device=device)
    decoder = make_decoder(model, 1, len(ids) + max_new_tokens)
    logits = decoder.prefill(seen)
    for _ in range(max_new_tokens):
        nxt = sample_next(logits, seen, temperature, top_k, top_p, repetition_penalty, generator)
        token = int(nxt[0])
        yield token
        if token == eos_id:
            return
        seen = torch.cat([seen, nxt[:, None]], dim=1)
        logits = decoder.step(nxt)


class IncrementalDecoder:
    """Text of each new token: decode everything so far and emit what is new, holding back
    while the text ends in an incomplete UTF-8 character (byte-level BPE splits them)."""

    def __init__(self, tokenizer):
        self.tokenizer, self.ids, self.emitted = tokenizer, [], 0

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        new, self.emitted = text[self.emitted:], len(text)
        return new

    def flush(self) -> str:
        """What `push` held back: a character the generation ended in the middle of decodes
        to U+FFFD, as in the text of all ids at once."""
        text = self.tokenizer.decode(self.ids)
        rest, self.emitted = text[self.emitted:], len(text)
        return rest


def _json_safe(value):
    """`value` with NaN and infinities as strings: JSON has no such numbers."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"


class ClosingStreamingResponse(StreamingResponse):
    """Closes its body iterator however the response ends: Starlette drops it unclosed when
    the client disconnects, and only the garbage collector would run its `finally`."""

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()


def create_app(loaded: LoadedModel, max_context: int | None = None) -> FastAPI:
    """`max_context` bounds prompt + max_new_tokens (default: the model's max_seq_len, the
    context it was trained at; give more only for a model that runs longer, e.g. with
    rope_scaling)."""
    model, tokenizer, eos_id = loaded.model, loaded.tokenizer, loaded.eos_id
    cfg = model.config
    max_context = max_context or cfg.max_seq_len
    lock = threading.Lock()
    app = FastAPI(title="mamba-slm generation", version="1")

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI's own handler echoes each bad input back, and a NaN or Infinity (which
        # Python's json parses) cannot be written as JSON: the 422 became a 500.
        return JSONResponse(status_code=422, content={"detail": _json_safe(jsonable_encoder(exc.errors()))})

    def encode(req: GenerateRequest) -> list[int]:
        if req.messages is not None:
            try:
                messages = validate_messages([m.model_dump() for m in req.messages], "request")
            except ValueError as exc:
                raise HTTPException(status_code=422, detail=str(exc)) from exc
            return prompt_ids(tokenizer, messages, eos_id)
        ids = tokenizer.encode(req.prompt).ids
        if not ids:
            raise HTTPException(status_code=422, detail="'prompt' encodes to no tokens; send some text")
        return ids

    def new_tokens(req: GenerateRequest, ids: list[int]) -> int:
        """max_new_tokens, checked against the context (the decoding cache is allocated for
        prompt + max_new_tokens, so an unbounded request would exhaust memory)."""
        room = max_context - len(ids)
        if room < 1:
            raise HTTPException(status_code=422, detail=(
                f"the prompt is {len(ids)} tokens, which leaves no room in the model's context of "
                f"{max_context} tokens; shorten it"))
        if req.max_new_tokens is None:
            return min(DEFAULT_MAX_NEW_TOKENS, room)
        if req.max_new_tokens > room:
            raise HTTPException(status_code=422, detail=(
                f"max_new_tokens {req.max_new_tokens} + the prompt's {len(ids)} tokens exceed the model's "
                f"context of {max_context} tokens; ask for at most {room} new tokens or shorten the prompt"))
        return req.max_new_tokens

    def run(req: GenerateRequest, ids: list[int], max_new_tokens: int) -> Iterator[int]:
        device = model.lm_head.weight.device
        generator = None if req.seed is None else torch.Generator(device).manual_seed(req.seed)
        return stream_token_ids(model, ids, max_new_tokens, eos_id, req.temperature, req.top_k,
                                req.top_p, req.repetition_penalty, generator)

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok", "quantized": loaded.quantized, "max_context": max_context,
                "model": {"name": cfg.name, "layer_pattern": cfg.layer_pattern, "vocab_size": cfg.vocab_size,
                          "max_seq_len": cfg.max_seq_len, "parameters": model.num_parameters()}}

    @app.post("/generate")
    def generate(req: GenerateRequest):
        ids = encode(req)
        max_new_tokens = new_tokens(req, ids)
        if req.stream:
            return ClosingStreamingResponse(_events(req, ids, max_new_tokens), media_type="text/event-stream",
                                            headers={"Cache-Control": "no-cache"})
        with lock:
            out = list(run(req, ids, max_new_tokens))
        finish = "eos" if out and out[-1] == eos_id else "length"
        return {"text": tokenizer.decode(out), "token_ids": out, "finish_reason": finish,
                "prompt_tokens": len(ids)}

    def _locked_tokens(req: GenerateRequest, ids: list[int], max_new_tokens: int) -> Iterator[int]:
        with lock:  # taken at the first token; released when the generator is closed
            yield from run(req, ids, max_new_tokens)

    async def _events(req: GenerateRequest, ids: list[int], max_new_tokens: int) -> AsyncIterator[str]:
        # An async generator whose `finally` closes the lock-holding token generator when the
        # client leaves (the task is cancelled here, or the response closes this generator).
        # Starlette's own wrapping of a sync generator left it to the garbage collector, and
        # every later request waited on the lock. The model steps in the thread pool.
        decoder, n, finish = IncrementalDecoder(tokenizer), 0, "length"
        tokens = _locked_tokens(req, ids, max_new_tokens)
        try:
            while (token := await run_in_threadpool(next, tokens, None)) is not None:
                n += 1
                if token == eos_id:
                    finish = "eos"
                yield _sse({"text": decoder.push(token), "token_id": token})
        finally:
            # Not awaited: a cancelled task's next await raises before running anything.
            # Safe here: run_in_threadpool waits for its thread even when cancelled, so the
            # generator is suspended, and closing it only unwinds to release the lock.
            tokens.close()
        yield _sse({"done": True, "text": decoder.flush(), "finish_reason": finish, "completion_tokens": n})

    return app
