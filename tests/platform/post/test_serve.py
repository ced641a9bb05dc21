"""The HTTP endpoint, as a real `jobs/serve.py` process on 127.0.0.1 spoken to by httpx:
greedy output equals `model.generate`, streamed events arrive one per token and add up
to the same text, chat messages use the template, bad requests get 422, and a client
that leaves a stream frees the model for the next request."""
from __future__ import annotations

import dataclasses
import gc
import json
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager

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
    assert done == {"done": True, "text": done["text"], "finish_reason": full["finish_reason"],
                    "completion_tokens": len(expected)}
    assert [e["token_id"] for e in tokens] == expected  # one event per token, in order
    assert "".join(e["text"] for e in events) == full["text"]


def test_stream_ending_inside_a_character_sends_its_tail(server, tiny_model_dir):
    """A generation that stops in the middle of a multi-byte character: the token events
    held that text back, and the done event carries it (the stream lost it before)."""
    loaded = load_model_dir(tiny_model_dir)
    ids = loaded.tokenizer.encode("hello").ids
    greedy = loaded.model.generate(torch.tensor([ids]), max_new_tokens=40, temperature=0.0,
                                   eos_id=loaded.eos_id)[0, len(ids):].tolist()
    cut = next(n for n in range(1, len(greedy) + 1) if loaded.tokenizer.decode(greedy[:n]).endswith("\ufffd"))
    body = {"prompt": "hello", "max_new_tokens": cut, "temperature": 0}
    full = httpx.post(f"{server}/generate", json=body, timeout=60).json()
    events = read_events(server, {**body, "stream": True})
    assert full["token_ids"] == greedy[:cut] and full["text"].endswith("\ufffd")
    assert events[-1]["done"] and events[-1]["text"].endswith("\ufffd")
    assert "".join(e["text"] for e in events) == full["text"]


def test_sampling_is_seeded_and_chat_uses_template(server, tiny_model_dir):
    body = {"messages": [{"role": "user", "content": "Who wrote Hamlet?"}], "max_new_tokens": 8,
            "temperature": 1.0, "top_k": 50, "seed": 7}
    a = httpx.post(f"{server}/generate", json=body, timeout=60).json()
    b = httpx.post(f"{server}/generate", json=body, timeout=60).json()
    assert a["token_ids"] == b["token_ids"]
    loaded = load_model_dir(tiny_model_dir)
    assert a["prompt_tokens"] == len(prompt_ids(loaded.tokenizer, body["messages"], loaded.eos_id))


@pytest.mark.parametrize("body, needle", [
    ({"prompt": "x", "messages": [{"role": "user", "content": "y"}]}, "exactly one of 'prompt'"),
    ({"max_new_tokens": 4}, "exactly one of 'prompt'"),
    ({"prompt": "x", "temperature": -1}, "temperature"),
    ({"messages": [{"role": "robot", "content": "y"}]}, "message 0 must be"),
    # misspelt fields are named, not silently replaced by the defaults
    ({"prompt": "x", "max_tokens": 5, "temp": 0}, "max_tokens"),
    ({"prompt": "x", "top-k": 1}, "top-k"),
    ({"messages": [{"role": "user", "content": "y", "name": "z"}]}, "name"),
    # Python's json reads NaN and Infinity; they were a 500, or random text at Infinity
    ('{"prompt": "x", "temperature": NaN}', "finite number"),
    ('{"prompt": "x", "temperature": Infinity}', "finite number"),
    ('{"prompt": "x", "top_p": NaN}', "finite number"),
    ('{"prompt": "x", "repetition_penalty": -Infinity}', "finite number"),
    ('{"prompt": "x", "extra": [NaN]}', "extra"),
    # numbers torch cannot use were a 500
    ({"prompt": "x", "seed": 2**70}, "seed"),
    ({"prompt": "x", "seed": -1}, "seed"),
    ({"prompt": "x", "temperature": 1e-40}, "give 0 for greedy decoding"),
    ({"prompt": "x", "top_p": 1e-300}, "top_p"),
    ({"prompt": "x", "repetition_penalty": 1e-300}, "repetition_penalty"),
    # the decoding cache is sized prompt + max_new_tokens: 10**7 allocated gigabytes
    ({"prompt": "x", "max_new_tokens": 10**7}, "exceed the model's context of 256 tokens; ask for at most"),
    ({"prompt": "ROMEO: " * 300, "max_new_tokens": 1}, "leaves no room in the model's context of 256"),
])
def test_bad_requests_are_422(server, body, needle):
    if isinstance(body, str):
        resp = httpx.post(f"{server}/generate", content=body, headers={"content-type": "application/json"},
                          timeout=30)
    else:
        resp = httpx.post(f"{server}/generate", json=body, timeout=30)
    assert resp.status_code == 422, resp.text
    assert needle in resp.text, resp.text


def test_context_bounds_max_new_tokens(server, tiny_model_dir):
    """prompt + max_new_tokens fit the model's context (256); the default 64 shrinks to the
    room a long prompt leaves."""
    tokenizer = load_model_dir(tiny_model_dir).tokenizer
    prompt = next(p for p in ("ROMEO: " * k for k in range(100, 0, -1)) if len(tokenizer.encode(p).ids) < 230)
    n = len(tokenizer.encode(prompt).ids)
    assert 256 - 64 < n < 256
    assert httpx.get(f"{server}/health").json()["max_context"] == 256
    out = httpx.post(f"{server}/generate", json={"prompt": prompt, "temperature": 0}, timeout=60).json()
    assert out["prompt_tokens"] == n and len(out["token_ids"]) <= 256 - n
    exact = httpx.post(f"{server}/generate", json={"prompt": prompt, "max_new_tokens": 256 - n}, timeout=60)
    assert exact.status_code == 200
    over = httpx.post(f"{server}/generate", json={"prompt": prompt, "max_new_tokens": 257 - n}, timeout=60)
    assert over.status_code == 422 and f"at most {256 - n} new tokens" in over.text


def test_max_context_flag_is_checked(repo_root, tiny_model_dir):
    proc = subprocess.run([sys.executable, "jobs/serve.py", "--checkpoint", str(tiny_model_dir), "--max-context", "1"],
                          cwd=repo_root, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "--max-context 1: give at least 2 tokens" in proc.stderr, proc.stderr


@contextmanager
def serving_in_thread(app):
    """uvicorn in a thread of this process, so the test controls the garbage collector."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        assert thread.is_alive() and time.time() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def test_client_leaving_a_stream_frees_the_model(tiny_model_dir):
    """A streaming client that disconnects early: its generation stops and the model lock is
    released, so the next request runs. The stream's generator used to keep the lock until
    the garbage collector happened to break a reference cycle (never, on an idle server),
    and every later request hung; the collector is off here to make that deterministic."""
    from mamba_slm.platform.post.serve import create_app

    # No EOS (id -1) and a context past the trained one: a stream far longer than the test.
    loaded = dataclasses.replace(load_model_dir(tiny_model_dir), eos_id=-1)
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        with serving_in_thread(create_app(loaded, max_context=8192)) as url:
            body = {"prompt": "ROMEO:", "max_new_tokens": 8000, "temperature": 0, "stream": True}
            with httpx.Client(timeout=30) as client, client.stream("POST", f"{url}/generate", json=body) as resp:
                assert resp.status_code == 200
                events = []
                for line in resp.iter_lines():
                    if line.startswith("data: "):
                        events.append(json.loads(line[len("data: "):]))
                    if len(events) == 3:
                        break  # leave: the connection closes with the 8000-token stream unfinished
            assert len(events) == 3 and not any("done" in e for e in events)
            # without the fix: httpx.ReadTimeout, the request waiting on the lock for ever
            resp = httpx.post(f"{url}/generate", json={"prompt": "ROMEO:", "max_new_tokens": 4}, timeout=10)
            assert resp.status_code == 200 and len(resp.json()["token_ids"]) == 4
    finally:
        if gc_was_enabled:
            gc.enable()


def test_place_keeps_int4_on_the_cpu(tiny_model_dir, tmp_path):
    """`place` (jobs/serve.py's device placement) refuses a GPU for an INT4 model with the way
    out, before touching any device; an INT8 model and the float one are not cpu_only."""
    from mamba_slm.platform.post.loading import place
    from mamba_slm.platform.post.quantize import QuantConfig, quantize_model, save_quantized

    loaded = load_model_dir(tiny_model_dir)
    assert not loaded.cpu_only
    dirs = {}
    for bits in (4, 8):
        qmodel = quantize_model(load_model_dir(tiny_model_dir).model, QuantConfig(bits=bits, group_size=32))
        dirs[bits] = save_quantized(qmodel, tmp_path / f"int{bits}", QuantConfig(bits=bits, group_size=32),
                                    tokenizer_file=tiny_model_dir / "tokenizer.json")
    int4, int8 = load_model_dir(dirs[4]), load_model_dir(dirs[8])
    assert int4.cpu_only and not int8.cpu_only
    with pytest.raises(ValueError, match="INT4 model, which runs on a CPU only: serve it with --device cpu"):
        place(int4, "cuda")
    place(int4, "cpu")  # fine where it runs


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_int8_model_is_served_from_the_gpu(tmp_path):
    """An INT8 directory placed on the GPU as jobs/serve.py does: int8 codes stay int8, the
    rest bf16, and greedy decoding (CUDA graphs) follows the CPU model's logits."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from mamba_slm.model import HybridLM, ModelConfig
    from mamba_slm.platform.post.loading import place
    from mamba_slm.platform.post.quantize import QuantConfig, quantize_model, save_quantized

    # Built here, not by tiny_model_dir: a GPU machine need not have the demo corpus.
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(["ROMEO: what light through yonder window breaks"] * 8,
                            trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"], show_progress=False,
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(tmp_path / "tokenizer.json"))
    torch.manual_seed(0)
    model = HybridLM(ModelConfig.from_name("tiny", vocab_size=tok.get_vocab_size(), layer_pattern="AMMA"))
    cfg = QuantConfig(bits=8)
    out = save_quantized(quantize_model(model, cfg), tmp_path / "int8", cfg, tokenizer_file=tmp_path / "tokenizer.json")
    cpu, gpu = load_model_dir(out), load_model_dir(out)
    place(gpu, "cuda")
    assert {b.dtype for b in gpu.model.buffers() if b.dtype == torch.int8} == {torch.int8}
    assert all(p.dtype == torch.bfloat16 and p.is_cuda for p in gpu.model.parameters())
    ids = torch.tensor([cpu.tokenizer.encode("ROMEO: what light").ids])
    with torch.no_grad():
        want = cpu.model(ids).logits[0, -1].float()
        got = gpu.model(ids.cuda()).logits[0, -1].float().cpu()
    assert (got - want).norm() / want.norm() < 3e-2
    tokens = gpu.model.generate(ids.cuda(), max_new_tokens=16, temperature=0, cuda_graphs=True)
    assert tokens.shape == (1, ids.shape[1] + 16)
