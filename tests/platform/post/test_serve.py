"""The HTTP endpoint, as a real `jobs/serve.py` process on 127.0.0.1 spoken to by httpx:
greedy output equals `model.generate`, streamed events arrive one per token and add up
to the same text, chat messages use the template, bad requests get 422."""
from __future__ import annotations

import json
import socket
import subprocess
import sys
import time

import httpx
import pytest
import torch

from mamba_slm.platform.post.chat import prompt_ids
from mamba_slm.platform.post.loading import load_model_dir


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_model_dir, repo_root):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "jobs/serve.py", "--checkpoint", str(tiny_model_dir),
                             "--port", str(port), "--threads", "1", "--log-level", "warning"],
                            cwd=repo_root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 90
    try:
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"server did not start: {proc.stdout.read() if proc.poll() is not None else ''}")
            time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def read_events(url: str, body: dict) -> list[dict]:
    events = []
    with httpx.Client(timeout=60) as client, client.stream("POST", f"{url}/generate", json=body) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        for line in resp.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line[len("data: "):]))
    return events


def test_health(server):
    info = httpx.get(f"{server}/health").json()
    assert info["status"] == "ok" and info["model"]["layer_pattern"] and info["quantized"] is False


def test_greedy_matches_model_generate_and_stream_adds_up(server, tiny_model_dir):
    loaded = load_model_dir(tiny_model_dir)
    prompt = "ROMEO: But soft, what light"
    ids = loaded.tokenizer.encode(prompt).ids
    expected = loaded.model.generate(torch.tensor([ids]), max_new_tokens=12, temperature=0.0,
                                     eos_id=loaded.eos_id)[0, len(ids):].tolist()
    if loaded.eos_id in expected:
        expected = expected[: expected.index(loaded.eos_id) + 1]
    body = {"prompt": prompt, "max_new_tokens": 12, "temperature": 0}
    full = httpx.post(f"{server}/generate", json=body, timeout=60).json()
    assert full["token_ids"] == expected and full["prompt_tokens"] == len(ids)
    assert full["text"] == loaded.tokenizer.decode(expected)

    events = read_events(server, {**body, "stream": True})
    tokens, done = events[:-1], events[-1]
    assert done == {"done": True, "finish_reason": full["finish_reason"], "completion_tokens": len(expected)}
    assert [e["token_id"] for e in tokens] == expected  # one event per token, in order
    assert "".join(e["text"] for e in tokens) == full["text"]


def test_sampling_is_seeded_and_chat_uses_template(server, tiny_model_dir):
    body = {"messages": [{"role": "user", "content": "Who wrote Hamlet?"}], "max_new_tokens": 8,
            "temperature": 1.0, "top_k": 50, "seed": 7}
    a = httpx.post(f"{server}/generate", json=body, timeout=60).json()
    b = httpx.post(f"{server}/generate", json=body, timeout=60).json()
    assert a["token_ids"] == b["token_ids"]
    loaded = load_model_dir(tiny_model_dir)
    assert a["prompt_tokens"] == len(prompt_ids(loaded.tokenizer, body["messages"], loaded.eos_id))


@pytest.mark.parametrize("body", [{"prompt": "x", "messages": [{"role": "user", "content": "y"}]},
                                  {"max_new_tokens": 4},
                                  {"prompt": "x", "temperature": -1},
                                  {"messages": [{"role": "robot", "content": "y"}]}])
def test_bad_requests_are_422(server, body):
    resp = httpx.post(f"{server}/generate", json=body, timeout=30)
    assert resp.status_code == 422, resp.text
