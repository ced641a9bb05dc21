"""Static-cache decoding equals the full forward; CUDA-graph decoding equals eager.

On a CPU the reference path runs (fp32, tight tolerances). The tests marked gpu run where
CUDA and mamba-ssm are present (the device machine; see bench/RESULTS.md): graph replay
against eager steps, and the kernel decode step against the reference step.
"""
import pytest
import torch

from mamba_slm.model import HybridLM, ModelConfig
from mamba_slm.model import generation, ssd
from mamba_slm.model.attention import KVState
from mamba_slm.model.generation import Decoder


def _model(pattern="AMAM", seed=0, device="cpu", **kw):
    torch.manual_seed(seed)
    return HybridLM(ModelConfig.from_name("tiny", layer_pattern=pattern, **kw)).to(device).eval()


def _decode_logits(model, ids, prompt_len, max_len=None):
    """Prefill ids[:, :prompt_len], then feed the rest one token at a time.
    -> logits (B, T, V) for every position from prompt_len - 1 on, and the cache."""
    cache = model.new_cache(ids.shape[0], max_len=max_len or ids.shape[1])
    logits = [model(ids[:, :prompt_len], cache=cache).logits[:, -1:]]
    for t in range(prompt_len, ids.shape[1]):
        logits.append(model(ids[:, t:t + 1], cache=cache).logits)
    return torch.cat(logits, 1), cache


@pytest.mark.parametrize("pattern", ["AMAM", "MAMA", "AAAA", "MMMM"])
@pytest.mark.parametrize("prompt_len", [1, 9])
@pytest.mark.parametrize("batch", [1, 3])
def test_static_cache_decode_equals_full_forward(pattern, prompt_len, batch):
    model = _model(pattern)
    ids = torch.randint(0, 4000, (batch, 40))
    full = model(ids).logits[:, prompt_len - 1:]
    # A cache larger than needed: positions past the filled ones must be masked out.
    stepped, cache = _decode_logits(model, ids, prompt_len, max_len=64)
    torch.testing.assert_close(stepped, full, atol=2e-5, rtol=1e-5)
    assert cache.seqlen == 40 and int(cache.offset) == 40


def test_decode_equals_packed_forward_at_shifted_positions():
    """The last document of a packed row sits at row positions 23..; RoPE is relative, so
    decoding it alone from position 0 gives the same logits."""
    model = _model("AMMA")
    doc = torch.randint(0, 4000, (2, 30))
    other = torch.randint(0, 4000, (2, 23))
    row = torch.cat([other, doc], 1)
    seq_idx = torch.tensor([[0] * 23 + [1] * 30] * 2)
    packed = model(row, seq_idx=seq_idx).logits[:, 23 + 4:]
    stepped, _ = _decode_logits(model, doc, prompt_len=5)
    torch.testing.assert_close(stepped, packed, atol=1e-4, rtol=1e-4)


def test_chunked_prefill_continues_the_cache():
    model = _model("AMAM")
    ids = torch.randint(0, 4000, (2, 50))
    cache = model.new_cache(2, max_len=50)
    parts = [model(ids[:, a:b], cache=cache).logits for a, b in [(0, 17), (17, 40), (40, 41), (41, 50)]]
    torch.testing.assert_close(torch.cat(parts, 1), model(ids).logits, atol=2e-5, rtol=1e-5)


def test_positions_past_the_cache_length_are_masked():
    model = _model("AMAM")
    ids = torch.randint(0, 4000, (2, 12))
    clean, _ = _decode_logits(model, ids, prompt_len=6, max_len=32)
    cache = model.new_cache(2, max_len=32)
    poisoned = [model(ids[:, :6], cache=cache).logits[:, -1:]]
    for t in range(6, 12):
        for state in cache.layers:
            if isinstance(state, KVState):  # garbage where no token has been written yet
                state.k[:, :, t:].uniform_(-1e3, 1e3)
                state.v[:, :, t:].uniform_(-1e3, 1e3)
        poisoned.append(model(ids[:, t:t + 1], cache=cache).logits)
    torch.testing.assert_close(torch.cat(poisoned, 1), clean, atol=2e-5, rtol=1e-5)


def test_cache_overflow_is_a_clear_error():
    model = _model("AMAM")
    ids = torch.randint(0, 4000, (1, 10))
    cache = model.new_cache(1, max_len=8)
    model(ids[:, :6], cache=cache)
    with pytest.raises(ValueError, match=r"max_len=8 .* has 6; 3 more"):
        model(ids[:, 6:9], cache=cache)
    model(ids[:, 6:7], cache=cache)
    model(ids[:, 7:8], cache=cache)
    with pytest.raises(ValueError, match="new_cache"):
        model(ids[:, 8:9], cache=cache)
    assert cache.seqlen == 8
    assert model.new_cache(1).max_len == model.config.max_seq_len


def test_decoder_reset_reuses_the_cache():
    model = _model("AMAM")
    ids = torch.randint(0, 4000, (2, 8))
    dec = Decoder(model, batch=2, max_len=16, cuda_graphs=False)
    first = [dec.prefill(ids)] + [dec.step(ids[:, 0]) for _ in range(3)]
    k_buffer = dec.cache.layers[0].k
    second = [dec.prefill(ids)] + [dec.step(ids[:, 0]) for _ in range(3)]
    assert dec.cache.layers[0].k is k_buffer  # same memory, emptied in place
    for a, b in zip(first, second):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_greedy_generate_with_eos_stops_when_every_row_is_done():
    model = _model("AMAM")
    prompt = torch.randint(0, 4000, (2, 5))
    free = model.generate(prompt, max_new_tokens=12, temperature=0)
    assert free.shape == (2, 17)
    eos = int(free[0, 5 + 3])  # row 0 emits it as its 4th new token
    out = model.generate(prompt, max_new_tokens=12, temperature=0, eos_id=eos)
    row1 = free[1, 5:].tolist()
    ends = [4, row1.index(eos) + 1 if eos in row1 else 12]
    assert out.shape == (2, 5 + max(ends))
    for r, end in enumerate(ends):  # greedy up to its first EOS, EOS after it
        assert out[r, 5:5 + end].tolist() == free[r, 5:5 + end].tolist()
        assert (out[r, 5 + end:] == eos).all()


def test_cuda_graphs_need_cuda():
    if torch.cuda.is_available():
        pytest.skip("CPU-only check")
    model = _model()
    with pytest.raises(ValueError, match="cuda_graphs=True needs the model on a CUDA device"):
        model.generate(torch.zeros(1, 3, dtype=torch.long), 2, cuda_graphs=True)
    assert generation.resolve_cuda_graphs(None, torch.device("cpu")) is False


@pytest.mark.parametrize("pattern", ["AMAM", "MMMM"])
@pytest.mark.parametrize("real", [1, 2, 11, 16])
def test_a_right_padded_prompt_leaves_the_cache_as_the_prompt_alone(pattern, real):
    """valid_len (the prompt graphs of Decoder.prefill): padding tokens change no Mamba-2
    state (dt = 0), the conv window keeps the last real inputs, the device offset counts
    real tokens only, the logits are the last real token's; the next steps agree."""
    model = _model(pattern)
    ids = torch.randint(0, 4000, (2, real + 6))
    padded = torch.cat([ids[:, :real], torch.randint(0, 4000, (2, 16 - real))], 1)
    a, b = model.new_cache(2, 32), model.new_cache(2, 32)
    with torch.no_grad():
        want = model(ids[:, :real], cache=a).logits[:, -1:]
        got = model(padded, cache=b, valid_len=torch.tensor([real])).logits
        assert got.shape == want.shape and int(b.offset) == real
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
        b.seqlen = real  # the caller's part (Decoder.prefill)
        for t in range(real, real + 6):
            torch.testing.assert_close(model(ids[:, t:t + 1], cache=b).logits, model(ids[:, t:t + 1], cache=a).logits,
                                       atol=2e-5, rtol=1e-5)
    for sa, sb in zip(a.layers, b.layers):
        if hasattr(sa, "ssm"):
            torch.testing.assert_close(sb.conv, sa.conv)
            torch.testing.assert_close(sb.ssm, sa.ssm, atol=2e-5, rtol=1e-5)


def test_a_prompt_graph_that_fails_to_capture_falls_back_to_the_eager_prompt(monkeypatch, caplog):
    """The prompt graph is an optimisation: if its capture fails, that length runs eagerly
    (warned once, not retried) instead of failing every request of that length. (Capture
    needs a GPU: a CPU decoder stands in with a fake step graph.)"""
    model = _model("AMAM")
    ids = torch.randint(0, 4000, (1, 11))
    want = Decoder(model, 1, 64, cuda_graphs=False).prefill(ids)
    dec = Decoder(model, 1, 64, cuda_graphs=False)
    dec.graph = object()  # as a graph decoder
    calls = []

    def broken(*args):
        calls.append(args)
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(dec, "_capture_prefill", broken)
    with caplog.at_level("WARNING"):
        for _ in range(2):
            torch.testing.assert_close(dec.prefill(ids), want)
            assert dec.cache.seqlen == 11 and int(dec.cache.offset) == 11
    assert len(calls) == 1 and "prompts of that length run eagerly" in caplog.text


def test_graph_decoders_are_bucketed_and_kept_least_recently_used(monkeypatch):
    """Cache lengths: multiples of 256, or powers of two for graph decoders whose attention
    reads only the filled positions (the GPU kernel); the model keeps the
    GRAPH_DECODERS_PER_MODEL graph decoders used last and drops those of other weights.
    (The capture itself needs a GPU: a stand-in Decoder records what would be captured.)"""
    from mamba_slm.model.attention import Attention

    model = _model("AMAM")
    assert [generation.cache_len(model, n, True) for n in (1, 256, 257, 700)] == [256, 256, 512, 768]
    monkeypatch.setattr(Attention, "reads_filled_cache_only", lambda self, device: True)
    assert [generation.cache_len(model, n, True) for n in (1, 256, 257, 700, 5000)] == [256, 256, 512, 1024, 8192]
    assert generation.cache_len(model, 700, False) == 768  # eager decoding: the multiple of 256

    captured = []

    class StandIn:
        def __init__(self, model, batch, max_len, cuda_graphs):
            self.max_len, self.key = max_len, None
            captured.append((batch, max_len))

    monkeypatch.setattr(generation, "Decoder", StandIn)
    monkeypatch.setattr(generation, "GRAPH_DECODERS_PER_MODEL", 2)
    first = generation.graph_decoder(model, 1, 256)
    assert generation.graph_decoder(model, 1, 256) is first  # reused, not recaptured
    generation.graph_decoder(model, 1, 512)
    generation.graph_decoder(model, 1, 256)  # used last: 512 is now the oldest
    generation.graph_decoder(model, 2, 256)  # a third: 512 goes
    assert captured == [(1, 256), (1, 512), (2, 256)]
    assert generation.graph_decoder(model, 1, 256) is first
    assert [k[:2] for k in generation._GRAPH_DECODERS[model]] == [(2, 256), (1, 256)]
    model.embed_tokens.weight.data = model.embed_tokens.weight.data.clone()  # other weights
    again = generation.graph_decoder(model, 1, 256)
    assert again is not first and list(generation._GRAPH_DECODERS[model].values()) == [again]


gpu = pytest.mark.skipif(not ssd.kernels_available(), reason="needs CUDA and mamba-ssm (GPU kernels)")


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graph_decode_equals_eager(dtype):
    model = _model("AMMA", device="cuda").to(dtype)
    prompt = torch.randint(0, 4000, (2, 13), device="cuda")
    eager = model.generate(prompt, max_new_tokens=24, temperature=0, cuda_graphs=False)
    graph = model.generate(prompt, max_new_tokens=24, temperature=0, cuda_graphs=True)
    again = model.generate(prompt, max_new_tokens=24, temperature=0)  # reuses the captured graph
    assert torch.equal(graph, eager) and torch.equal(again, eager)
    # Logits too, step by step, with the graph's cache sized differently from eager's.
    ids = eager
    eager_dec = Decoder(model, 2, 37, cuda_graphs=False)
    graph_dec = Decoder(model, 2, 256, cuda_graphs=True)
    a, b = eager_dec.prefill(ids[:, :13]), graph_dec.prefill(ids[:, :13])
    for t in range(13, 37):
        torch.testing.assert_close(b.float(), a.float(), atol=1e-3 if dtype == torch.float32 else 3e-2,
                                   rtol=1e-3 if dtype == torch.float32 else 3e-2)
        a, b = eager_dec.step(ids[:, t]), graph_dec.step(ids[:, t])


@gpu
@pytest.mark.gpu
def test_kernel_decode_step_matches_reference_step():
    """causal_conv1d_update + selective_state_update + Triton gated norm vs the PyTorch step."""
    kernel = _model("MAMM", device="cuda")
    reference = _model("MAMM", device="cuda", ssm_path="reference")
    reference.load_state_dict(kernel.state_dict())
    ids = torch.randint(0, 4000, (2, 40), device="cuda")
    with torch.no_grad():
        got, _ = _decode_logits(kernel, ids, prompt_len=8)
        want, _ = _decode_logits(reference, ids, prompt_len=8)
    err = ((got - want).abs().max() / want.abs().max()).item()
    print(f"\ndecode step, kernel vs reference (fp32): rel err {err:.2e}")
    assert err < 1.5e-2  # as the whole-model check of test_kernel_parity.py (TF32 dots in the SSD)


def test_packed_projections_decode_the_same_and_leave_training_alone():
    """pack_for_decoding: q|k|v and gate|up become views of one tensor each; decoding is
    unchanged, parameters keep their names and values, autograd never sees the packed
    tensor, and a dtype change lapses the packing instead of reading stale weights."""
    model = _model("AMAM")
    ids = torch.randint(0, 4000, (2, 20))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        want, _ = _decode_logits(model, ids, prompt_len=5)
    model.pack_for_decoding()
    attn, mlp = model.layers[0].mixer, model.layers[0].feed_forward
    assert attn.qkv.weight is not None and attn.q_proj.weight.data_ptr() == attn.qkv.weight.data_ptr()
    assert mlp.up_proj.weight.data_ptr() == mlp.gate_up.weight[mlp.gate_proj.weight.shape[0]:].data_ptr()
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    with torch.no_grad():
        got, _ = _decode_logits(model, ids, prompt_len=5)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert attn.qkv.packed() is None  # grad mode: the separate projections run
    model(ids, labels=ids).loss.backward()
    assert attn.q_proj.weight.grad is not None and mlp.gate_proj.weight.grad is not None
    model.pack_for_decoding()  # already packed: the same storage stays
    assert attn.q_proj.weight.data_ptr() == attn.qkv.weight.data_ptr()
    model.double()
    with torch.no_grad():
        assert attn.qkv.packed() is None and mlp.gate_up.packed() is None
        again, _ = _decode_logits(model, ids.clone(), prompt_len=5)
    torch.testing.assert_close(again.float(), want, atol=1e-5, rtol=1e-5)
