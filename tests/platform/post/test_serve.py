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
