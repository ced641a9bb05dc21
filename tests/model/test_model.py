import pytest
import torch
import torch.nn.functional as F

from mamba_slm.model import HybridLM, ModelConfig
from mamba_slm.model.generation import filter_top_k_top_p, apply_repetition_penalty
from mamba_slm.model.io import load_pretrained, save_pretrained


def _model(pattern="AMAM", seed=0, **kw):
    torch.manual_seed(seed)
    return HybridLM(ModelConfig.from_name("tiny", layer_pattern=pattern, **kw)).eval()


def test_forward_shapes_and_loss():
    model = _model()
    ids = torch.randint(0, 4000, (2, 33))
    out = model(ids, labels=ids)
    assert out.logits.shape == (2, 33, model.config.padded_vocab_size)
    assert out.loss.ndim == 0 and 7 < out.loss.item() < 10  # ~ln(4096) at init


@pytest.mark.parametrize("pattern", ["AMAM", "MMMM", "AAAA"])
def test_incremental_decode_equals_full_forward(pattern):
    model = _model(pattern)
    ids = torch.randint(0, 4000, (2, 45))
    full = model(ids).logits
    cache = model.new_cache(2)
    steps = [model(ids[:, :17], cache=cache).logits]  # prefill crosses a chunk boundary (32)
    steps += [model(ids[:, t:t + 1], cache=cache).logits for t in range(17, 45)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)
    assert cache.seqlen == 45


def test_greedy_generation_matches_argmax_of_full_forward():
    model = _model()
    prompt = torch.randint(0, 4000, (1, 9))
    out = model.generate(prompt, max_new_tokens=8, temperature=0)
    logits = model(out[:, :-1]).logits[:, 8:, :model.config.vocab_size]
    assert torch.equal(logits.argmax(-1), out[:, 9:])


def test_document_masking_isolates_documents():
    model = _model()
    ids = torch.randint(0, 4000, (2, 70))
    seq_idx = torch.tensor([[0] * 25 + [1] * 45, [0] * 40 + [1] * 30])
    changed = ids.clone()
    changed[0, :25] = torch.randint(0, 4000, (25,))
    changed[1, :40] = torch.randint(0, 4000, (40,))
    a, b = model(ids, seq_idx=seq_idx).logits, model(changed, seq_idx=seq_idx).logits
    torch.testing.assert_close(a[0, 25:], b[0, 25:])
    torch.testing.assert_close(a[1, 40:], b[1, 40:])
    assert (a[0, :25] - b[0, :25]).abs().max() > 1e-2  # the change itself is visible
    alone = model(ids[:1, 25:]).logits
    torch.testing.assert_close(a[:1, 25:], alone, atol=1e-5, rtol=1e-5)


def test_gradient_checkpointing_gives_same_gradients():
    model = _model().train()
    ids = torch.randint(0, 4000, (2, 40))
    model(ids, labels=ids).loss.backward()
    ref = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.set_gradient_checkpointing(True)
    model(ids, labels=ids).loss.backward()
    for g_ref, p in zip(ref, model.parameters()):
        torch.testing.assert_close(p.grad, g_ref, atol=1e-6, rtol=1e-5)


def test_bf16_autocast_forward_is_close_to_fp32():
    model = _model()
    ids = torch.randint(0, 4000, (2, 40))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = model(ids, labels=ids).loss
    assert abs(low.item() - model(ids, labels=ids).loss.item()) < 0.05
    assert all(p.dtype == torch.float32 for p in model.parameters())  # fp32 master weights


def test_tiny_model_overfits_a_batch():
    model = _model().train()
    ids = torch.randint(0, 4000, (4, 65), generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(60):  # below 10% by step ~40; ~0.09 (1% of the initial 8.3) at 60
        loss = model(ids[:, :-1], labels=ids[:, 1:]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.1 * losses[0]


def test_init_of_ssm_parameters():
    model = _model("MMMM")
    mixer = model.layers[0].mixer
    A = -torch.exp(mixer.A_log)
    assert ((A <= -1) & (A >= -16)).all()
    dt = torch.nn.functional.softplus(mixer.dt_bias)
    assert ((dt > 9e-4) & (dt < 0.11)).all()
    assert torch.equal(mixer.D, torch.ones_like(mixer.D))
    assert mixer.A_log._no_weight_decay and mixer.dt_bias._no_weight_decay


def test_meta_device_build_and_flops():
    with torch.device("meta"):
        model = HybridLM(ModelConfig.from_name("1.3B"))
    n = model.num_parameters()
    assert model.flops_per_token(8192) == 6 * n + 12 * 6 * 2048 * 8192


def test_save_and_load_round_trip(tmp_path):
    model = _model()
    save_pretrained(model, tmp_path / "m")
    loaded = load_pretrained(tmp_path / "m")
    ids = torch.randint(0, 4000, (1, 20))
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits, atol=0, rtol=0)
    assert loaded.lm_head.weight is loaded.embed_tokens.weight
    model.pack_for_decoding()  # weights become views of packed tensors: still saved one by one
    save_pretrained(model, tmp_path / "packed")
    torch.testing.assert_close(load_pretrained(tmp_path / "packed")(ids).logits, model(ids).logits, atol=0, rtol=0)
    with pytest.raises(ValueError, match="reserved"):  # would have replaced the config itself
        save_pretrained(model, tmp_path / "bad", metadata={"model": "mine"})


def test_kernel_path_missing_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("CPU-only check")
    model = _model(ssm_path="kernel")
    with pytest.raises(RuntimeError, match="ssm_path='kernel'"):
        model(torch.randint(0, 4000, (1, 8)))


def test_sampling_filters():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0]])
    kept = filter_top_k_top_p(logits, top_k=2)
    assert torch.isinf(kept[0, 2:]).all() and torch.isfinite(kept[0, :2]).all()
    nucleus = filter_top_k_top_p(logits, top_p=0.7)  # p = .64, .24, ...: two tokens reach 0.7
    assert torch.isfinite(nucleus[0, :2]).all() and torch.isinf(nucleus[0, 2:]).all()
    pen = apply_repetition_penalty(logits, torch.tensor([[0, 4]]), 2.0)
    assert pen[0, 0] == 1.5 and pen[0, 4] == -2.0 and pen[0, 1] == 2.0


def test_sampling_is_seeded_and_varied():
    model = _model()
    prompt = torch.randint(0, 4000, (1, 5))
    gen = lambda s: model.generate(prompt, 10, temperature=1.0, top_k=50, top_p=0.95,
                                   repetition_penalty=1.1, generator=torch.Generator().manual_seed(s))
    assert torch.equal(gen(1), gen(1))
    assert not torch.equal(gen(1), gen(2))


def test_chunked_loss_equals_full_loss_and_gradients():
    model = _model().train()
    ids = torch.randint(0, 4000, (2, 50))
    labels = ids.clone()
    labels[:, :5] = -100
    full = model(ids, labels=labels).loss
    full.backward()
    ref = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    h_loss = model(ids, labels=labels, return_logits=False)
    assert h_loss.logits is None
    torch.testing.assert_close(h_loss.loss, full)
    torch.testing.assert_close(model.chunked_loss(model.final_norm(_hidden(model, ids)), labels, chunk_tokens=7), full)
    h_loss.loss.backward()
    for g_ref, p in zip(ref, model.parameters()):
        torch.testing.assert_close(p.grad, g_ref, atol=1e-6, rtol=1e-5)
    ignored = torch.full_like(labels, -100)  # both paths: 0, not NaN (a mean over no labels)
    assert model(ids, labels=ignored).loss.item() == model(ids, labels=ignored, return_logits=False).loss.item() == 0
    ignored = torch.full_like(labels, -100)  # both paths: 0, not NaN (a mean over no labels)
    assert model(ids, labels=ignored).loss.item() == model(ids, labels=ignored, return_logits=False).loss.item() == 0


def _hidden(model, ids):
    h, residual = model.embed_tokens(ids), None
    for block in model.layers:
        h, residual = block(h, residual)
    return h + residual


def test_fused_on_gpu_runs_plain_on_cpu_and_falls_back_when_compile_fails(monkeypatch, caplog):
    from mamba_slm.model import layers

    calls = []

    def double(x):
        calls.append(x.device.type)
        return x * 2

    wrapped = layers.fused_on_gpu(double)
    x = torch.ones(3)
    assert torch.equal(wrapped(x), x * 2) and calls == ["cpu"]  # CPU: never compiled

    def broken_compile(fn, **kw):
        def run(*a):
            raise RuntimeError("no C compiler")
        return run

    class FakeCuda:  # a tensor that says it is on CUDA, to reach the compile branch
        is_cuda = True
        device = torch.device("cpu")

        def __mul__(self, k):
            return k

    monkeypatch.setattr(torch, "compile", broken_compile)
    wrapped = layers.fused_on_gpu(double)
    with caplog.at_level("WARNING"):
        assert wrapped(FakeCuda()) == 2 and wrapped(FakeCuda()) == 2
    assert sum("torch.compile of double failed" in r.message for r in caplog.records) == 1


def test_flex_document_attention_equals_dense_mask():
    """attn_impl="flex" (FlexAttention with a block mask of the documents; compiled on a
    GPU, eager here) gives the logits of SDPA with the dense document mask. FlexAttention
    has no CPU backward, so this is forward only; the GPU parity test
    (test_kernel_parity.py, attn_impl="auto" -> flex without flash-attn) checks gradients."""
    torch.manual_seed(0)
    dense = HybridLM(ModelConfig.from_name("tiny", attn_impl="sdpa")).eval()
    flex = HybridLM(ModelConfig.from_name("tiny", attn_impl="flex")).eval()
    flex.load_state_dict(dense.state_dict())
    ids = torch.randint(0, 4000, (2, 150))
    seq_idx = torch.tensor([[0] * 25 + [1] * 100 + [2] * 25, [0] * 140 + [1] * 10])
    with torch.no_grad():
        ref, out = dense(ids, seq_idx=seq_idx).logits, flex(ids, seq_idx=seq_idx).logits
        plain = flex(ids).logits  # without documents: no mask, the causal SDPA path
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert (plain - ref)[0, 25:].abs().max() > 1e-3  # the documents did change the result


def test_document_block_mask_equals_create_block_mask():
    """The documents' block mask, built from each 128-token block's id range, is the mask
    create_block_mask finds by evaluating every (b, q, kv) (which needs 20 GB at T = 32K):
    the same BlockMask for packed rows, lengths off the block size included;
    and where ids do not increase (ranges meet without a shared id) the extra partial blocks
    leave FlexAttention's output equal to SDPA with the dense mask."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    from mamba_slm.model import attention

    def reference(seq_idx):
        def same_document_causal(b, h, q, kv):
            return (q >= kv) & (seq_idx[b, q] == seq_idx[b, kv])
        return create_block_mask(same_document_causal, seq_idx.shape[0], None, seq_idx.shape[1],
                                 seq_idx.shape[1], device="cpu")

    g = torch.Generator().manual_seed(0)
    for T in (640, 150, 1000):
        seq_idx = torch.sort(torch.randint(0, 6, (2, T), generator=g), dim=1).values
        seq_idx[1] = 0  # one document filling a row: full blocks below the diagonal
        ours, ref = attention.build_document_block_mask(seq_idx), reference(seq_idx)
        # every field (kv and q block counts and indices, partial and full, block size,
        # lengths) but the mask_mod function object: FlexAttention's kernels get the same input
        fields = [(a, b) for a, b in zip(ours.as_tuple(), ref.as_tuple()) if not callable(a)]
        assert len(fields) == 16 and sum(isinstance(a, torch.Tensor) for a, _ in fields) == 8
        for a, b in fields:
            assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b, T
    seq_idx = torch.zeros(2, 640, dtype=torch.long)
    seq_idx[0, 100:], seq_idx[0, 390:] = 1, 2
    seq_idx[1, 129:] = 1
    mask = attention.document_block_mask(seq_idx)
    # row 0, documents [0, 100) [100, 390) [390, 640): partial and full blocks per query block
    assert mask.kv_num_blocks[0, 0].tolist() == [1, 2, 2, 4, 2]
    assert mask.full_kv_num_blocks[0, 0].tolist() == [0, 0, 1, 0, 0]

    seq_idx = torch.tensor([[0, 2] * 64 + [1] * 128 + [2] * 100])  # block 0 spans ids 0..2, block 1 is id 1
    q, k, v = (torch.randn(1, 2, 356, 16, generator=g) for _ in range(3))
    with torch.no_grad():
        out = flex_attention(q, k, v, block_mask=attention.build_document_block_mask(seq_idx))
        want = F.scaled_dot_product_attention(q, k, v, attn_mask=attention.document_causal_mask(seq_idx))
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
