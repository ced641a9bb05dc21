"""HTTP generation endpoint: a FastAPI app served by uvicorn (`jobs/serve.py`).

    GET  /health    -> {"status": "ok", "model": {...config summary}, "quantized": bool}
    POST /generate  {"prompt": str} or {"messages": [{"role", "content"}, ...]}
                    + max_new_tokens, temperature (0 = greedy), top_k, top_p,
                    repetition_penalty, seed, stream
        stream=false -> {"text", "token_ids", "finish_reason": "eos" | "length", "prompt_tokens"}
        stream=true  -> text/event-stream (Server-Sent Events), one event per generated
                        token `data: {"text": "...", "token_id": n}` (text may be "" while a
                        multi-byte character is incomplete), then
                        `data: {"done": true, "finish_reason": ..., "completion_tokens": n}`.

`messages` are rendered with the fine-tuning chat template (`platform.post.chat`), so a
model from jobs/finetune.py answers in the format it was trained on.

Decoding uses the model's inference cache (one recurrent Mamba-2 step and one cached
attention read per token). One request runs at a time (a lock around the model): a CPU
serves one sequence fastest with all its cores. Scale out with more replicas.
"""
from __future__ import annotations

import json
import threading
from typing import Iterator

import torch
from fastapi import FastAPI, HTTPException
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field, model_validator

from mamba_slm.model.generation import make_decoder, sample_next

from .chat import prompt_ids, validate_messages
from .loading import LoadedModel


class Message(BaseModel):
    role: str
    content: str


class GenerateRequest(BaseModel):
    prompt: str | None = None
    messages: list[Message] | None = None
    max_new_tokens: int = Field(64, ge=1)
    temperature: float = Field(0.8, ge=0.0)
    top_k: int = Field(0, ge=0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    repetition_penalty: float = Field(1.0, gt=0.0)
    seed: int | None = None
    stream: bool = False

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


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"


def create_app(loaded: LoadedModel) -> FastAPI:
    model, tokenizer, eos_id = loaded.model, loaded.tokenizer, loaded.eos_id
    cfg = model.config
    lock = threading.Lock()
    app = FastAPI(title="mamba-slm generation", version="1")

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

    def run(req: GenerateRequest, ids: list[int]) -> Iterator[int]:
        device = model.lm_head.weight.device
        generator = None if req.seed is None else torch.Generator(device).manual_seed(req.seed)
        return stream_token_ids(model, ids, req.max_new_tokens, eos_id, req.temperature, req.top_k,
                                req.top_p, req.repetition_penalty, generator)

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok", "quantized": loaded.quantized,
                "model": {"name": cfg.name, "layer_pattern": cfg.layer_pattern, "vocab_size": cfg.vocab_size,
                          "max_seq_len": cfg.max_seq_len, "parameters": model.num_parameters()}}

    @app.post("/generate")
    def generate(req: GenerateRequest):
        ids = encode(req)
        if req.stream:
            return StreamingResponse(_events(req, ids), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        with lock:
            out = list(run(req, ids))
        finish = "eos" if out and out[-1] == eos_id else "length"
        return {"text": tokenizer.decode(out), "token_ids": out, "finish_reason": finish,
                "prompt_tokens": len(ids)}

    def _events(req: GenerateRequest, ids: list[int]) -> Iterator[str]:
        decoder, n, finish = IncrementalDecoder(tokenizer), 0, "length"
        with lock:  # held across yields: released when the stream ends or the client leaves
            for token in run(req, ids):
                n += 1
                if token == eos_id:
                    finish = "eos"
                yield _sse({"text": decoder.push(token), "token_id": token})
        yield _sse({"done": True, "finish_reason": finish, "completion_tokens": n})

    return app
