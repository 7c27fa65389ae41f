"""Chunked completion log-probs == the plain full-vocabulary formulation (values and gradients), with bounded memory."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from pgrpo import grpo
from pgrpo.adapter import SVDAdapter
from pgrpo.model import build_tiny_model


def _batch(seed=0, B=3, P=7, lens=(9, 4, 12), pad=259):
    gen = torch.Generator().manual_seed(seed)
    T = P + max(lens)
    ids = torch.full((B, T), pad)
    attn = torch.zeros(B, T, dtype=torch.long)
    cm = torch.zeros(B, T, dtype=torch.long)
    prompt = torch.randint(0, 256, (P,), generator=gen)
    for b, n in enumerate(lens):
        ids[b, :P] = prompt
        ids[b, P:P + n] = torch.randint(0, 256, (n,), generator=gen)
        attn[b, :P + n] = 1
        cm[b, P:P + n] = 1
    return ids, attn, cm


def _loss_and_grad(fn, model, ad, batch, temperature):
    ad.zero_grad()
    logp = fn(model, *batch, temperature=temperature)
    w = torch.linspace(-1, 2, logp.numel()).view_as(logp)
    (logp * w).sum().backward()
    return logp.detach(), ad.collect_grad().clone()


GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")


@pytest.mark.parametrize("mode,dtype,device", [("merged", torch.float32, "cpu"), ("factored", torch.float32, "cpu"),
                                               ("merged", torch.bfloat16, "cpu"),
                                               pytest.param("merged", torch.bfloat16, "cuda", marks=[GPU, pytest.mark.cuda])])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_chunked_logprobs_and_grads_equal_the_full_formulation(monkeypatch, mode, dtype, device, temperature):
    torch.manual_seed(0)
    model = build_tiny_model(seed=0).to(dtype)
    ad = SVDAdapter(model, mode=mode)
    ad.to(device)
    with torch.no_grad():
        ad.delta.copy_(torch.randn(ad.R, generator=torch.Generator().manual_seed(1)).to(device) * 0.05)
    ad.merge()
    batch = tuple(t.to(device) for t in _batch())
    ref, gref = _loss_and_grad(grpo.completion_logprobs_full, model, ad, batch, temperature)
    monkeypatch.setattr(grpo, "LOGPROB_CHUNK_BYTES", 4 * 260 * 5)   # 5 tokens per chunk: many chunks
    got, g = _loss_and_grad(grpo.completion_logprobs, model, ad, batch, temperature)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(got, ref, **tol)
    assert torch.equal(got == 0, ref == 0)              # the same positions are scored
    gtol = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(g, gref, rtol=gtol, atol=gtol * gref.abs().max().item())


def test_temperature_divides_the_logits():
    model = build_tiny_model(seed=0)
    ids, attn, cm = _batch(lens=(5, 5, 5))
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=attn).logits.float()
        ref = torch.log_softmax(logits[:, :-1] / 0.5, -1).gather(-1, ids[:, 1:, None])[..., 0]
        got = grpo.completion_logprobs(model, ids, attn, cm, temperature=0.5)
    torch.testing.assert_close(got[:, 1:][cm[:, 1:].bool()], ref[cm[:, 1:].bool()], rtol=1e-5, atol=1e-5)
    with torch.no_grad():   # temperature 0 (greedy sampling) scores the untempered logits, never divides by 0
        t0 = grpo.completion_logprobs(model, ids, attn, cm, temperature=0.0)
        t1 = grpo.completion_logprobs(model, ids, attn, cm)
    assert torch.equal(t0, t1) and torch.isfinite(t0).all()


class _LargestFloat(TorchDispatchMode):
    """Records the largest fp32 tensor any op produces (forward and backward)."""
    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else [out]):
            if isinstance(t, torch.Tensor) and t.dtype == torch.float32:
                self.largest = max(self.largest, t.numel())
        return out


def test_loss_pass_never_holds_full_vocab_fp32_logits_for_the_batch(monkeypatch):
    # a wide vocabulary so that logits dominate every other tensor of the forward/backward
    V = 8192
    model = build_tiny_model(seed=0, vocab_size=V).to(torch.bfloat16)
    ad = SVDAdapter(model, mode="merged")
    ids, attn, cm = _batch(lens=(40, 30, 45))
    n_tokens = int(cm[:, 1:].sum())
    chunk = 16
    monkeypatch.setattr(grpo, "LOGPROB_CHUNK_BYTES", 4 * V * chunk)
    with _LargestFloat() as mon:
        logp = grpo.completion_logprobs(model, ids, attn, cm)
        logp.sum().backward()
    assert mon.largest <= chunk * V < n_tokens * V
    with _LargestFloat() as full:   # the plain formulation does hold them (so the monitor can see it)
        grpo.completion_logprobs_full(model, ids, attn, cm).sum().backward()
    assert full.largest >= n_tokens * V
