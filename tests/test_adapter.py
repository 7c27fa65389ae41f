"""SVD-basis adapter on the real tiny Qwen3: exactness at delta=0, merged == factored, cache, state."""
import os

import pytest
import torch

from pgrpo.adapter import DEFAULT_TARGETS, SVDAdapter
from pgrpo.errors import UserError
from pgrpo.model import build_tiny_model


@pytest.fixture(scope="module")
def ids():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 256, (3, 17), generator=g)


@pytest.fixture(scope="module")
def base_logits(ids):
    with torch.no_grad():
        return build_tiny_model(seed=0)(ids).logits


def _pair(**kw):
    """A merged and a factored adapter on two identical tiny models."""
    mm, mf = build_tiny_model(seed=0), build_tiny_model(seed=0)
    return (mm, SVDAdapter(mm, mode="merged", **kw)), (mf, SVDAdapter(mf, mode="factored", **kw))


def _set_knob(ad, d, hack=False):
    with torch.no_grad():
        (ad.delta_hack if hack else ad.delta).copy_(d)
    ad.merge()


def _loss(model, ids):
    """A loss that touches every position and logit, like the policy-gradient loss does."""
    logits = model(ids).logits
    w = torch.linspace(-1, 1, logits.shape[-1])
    return (logits.log_softmax(-1) * w).sum(-1).mean() + logits.square().mean()


def test_layout_and_only_knobs_trainable():
    m = build_tiny_model()
    n_layers = m.config.num_hidden_layers
    ad = SVDAdapter(m, mode="factored")
    assert len(ad.names) == 7 * n_layers
    assert all(n.rsplit(".", 1)[-1] in DEFAULT_TARGETS for n in ad.names)
    assert ad.offsets[0] == 0 and len(ad.offsets) == len(ad.names) + 1
    for n, r, a, b in zip(ad.names, ad.ranks, ad.offsets, ad.offsets[1:]):
        W = m.get_submodule(n).weight
        assert r == min(W.shape) == b - a
        assert ad.delta_S(n).shape == (r,)
    assert ad.delta.dtype == torch.float32 and ad.delta.shape == (ad.R,) and not ad.delta.any()
    assert [p for p in m.parameters() if p.requires_grad] == []
    assert ad.parameters() == [ad.delta]
    # merged: the adapted weights need grads for G_W, but they are not optimizer parameters
    m2 = build_tiny_model()
    ad2 = SVDAdapter(m2, mode="merged")
    trainable = {n for n, p in m2.named_parameters() if p.requires_grad}
    assert trainable == {n + ".weight" for n in ad2.names}
    assert ad2.parameters() == [ad2.delta]


def test_svd_factors_reconstruct_w0():
    m = build_tiny_model()
    ad = SVDAdapter(m, mode="merged")
    for n in ad.names:
        W0 = m.get_submodule(n).weight.detach()
        U, Vh = ad.U(n), ad.Vh(n)
        r = min(W0.shape)
        assert U.shape == (W0.shape[0], r) and Vh.shape == (r, W0.shape[1])
        assert torch.allclose(U.T @ U, torch.eye(r), atol=1e-5)
        S = torch.diagonal(U.T @ W0 @ Vh.T)
        assert torch.allclose(U @ torch.diag(S) @ Vh, W0, atol=1e-5)


@pytest.mark.parametrize("mode", ["merged", "factored"])
def test_zero_knob_reproduces_base_logits_exactly(mode, ids, base_logits):
    m = build_tiny_model(seed=0)
    ad = SVDAdapter(m, mode=mode)
    with torch.no_grad():
        assert torch.equal(m(ids).logits, base_logits)
    # after a round trip through a non-zero knob, zero again is still bitwise the base model
    _set_knob(ad, torch.full((ad.R,), 0.1))
    with torch.no_grad():
        assert not torch.allclose(m(ids).logits, base_logits)
    _set_knob(ad, torch.zeros(ad.R))
    with torch.no_grad():
        assert torch.equal(m(ids).logits, base_logits)
        _set_knob(ad, torch.full((ad.R,), 0.1))
        with ad.disabled():
            assert torch.equal(m(ids).logits, base_logits)
            ad.merge()  # merging inside the context is allowed and shows after it
            assert torch.equal(m(ids).logits, base_logits)
        assert not torch.allclose(m(ids).logits, base_logits)


def test_merge_after_knob_change_matches_factored_forward(ids):
    (mm, am), (mf, af) = _pair()
    d = torch.randn(am.R, generator=torch.Generator().manual_seed(3)) * 0.1
    _set_knob(am, d)
    _set_knob(af, d)
    with torch.no_grad():
        lm, lf = mm(ids).logits, mf(ids).logits
    assert torch.allclose(lm, lf, rtol=1e-4, atol=1e-5)
    # and the merged weight really is W0 + U diag(d) Vh
    n = am.names[5]
    a, b = am.offsets[5], am.offsets[6]
    W0 = mf.get_submodule(n).weight
    assert torch.allclose(mm.get_submodule(n).weight, W0 + am.U(n) @ torch.diag(d[a:b]) @ am.Vh(n), atol=1e-6)


def test_merged_grad_equals_factored_autograd_grad(ids):
    """The central identity: G_W -> basis_change == autograd through the factored adapter."""
    (mm, am), (mf, af) = _pair()
    d = torch.randn(am.R, generator=torch.Generator().manual_seed(4)) * 0.05
    _set_knob(am, d)
    _set_knob(af, d)
    am.zero_grad()
    af.zero_grad()
    ptrs = [lin.weight.grad.data_ptr() for g in am.groups for lin in g.linears]
    for half in (ids[:2], ids[2:]):  # gradient accumulation over two micro-batches
        _loss(mm, half).backward()
        _loss(mf, half).backward()
    # AccumulateGrad added into the preallocated stack views in place (no copies)
    assert ptrs == [lin.weight.grad.data_ptr() for g in am.groups for lin in g.linears]
    assert ptrs == [g.G[j].data_ptr() for g in am.groups for j in range(g.L)]
    gm, gf = am.collect_grad(), af.collect_grad()
    assert gm.dtype == torch.float32 and gm.shape == (am.R,)
    assert gf.abs().max() > 0
    torch.testing.assert_close(gm, gf, rtol=1e-4, atol=1e-6 * gf.abs().max().item())
    assert am.delta.grad is gm and torch.equal(af.delta.grad, gf)
    # zero_grad really clears the accumulated G_W
    am.zero_grad()
    assert am.delta.grad is None and not any(g.G.any() for g in am.groups)
    _loss(mm, ids[:2]).backward()
    mf.zero_grad(set_to_none=True)
    af.zero_grad()
    _loss(mf, ids[:2]).backward()
    torch.testing.assert_close(am.collect_grad(), af.collect_grad(), rtol=1e-4, atol=1e-6 * gf.abs().max().item())


def test_merged_grad_survives_replaced_weight_grads(ids):
    """If someone sets weight.grad = None (model.zero_grad()), collect_grad is still right."""
    (mm, am), (mf, af) = _pair()
    am.zero_grad()
    af.zero_grad()
    mm.zero_grad(set_to_none=True)  # breaks the views
    _loss(mm, ids).backward()
    _loss(mf, ids).backward()
    gf = af.collect_grad()
    torch.testing.assert_close(am.collect_grad(), gf, rtol=1e-4, atol=1e-6 * gf.abs().max().item())
    am.zero_grad()  # views restored
    assert all(lin.weight.grad.data_ptr() == g.G[j].data_ptr() for g in am.groups for j, lin in enumerate(g.linears))


def test_target_and_layer_selection():
    m = build_tiny_model(num_hidden_layers=3)
    ad = SVDAdapter(m, targets=("q_proj", "down_proj"), layers=(1, 3), mode="factored")
    assert sorted(ad.names) == sorted(f"model.layers.{i}.{k}" for i in (1, 2)
                                      for k in ("self_attn.q_proj", "mlp.down_proj"))
    m = build_tiny_model(num_hidden_layers=3)
    ad = SVDAdapter(m, targets=("*.mlp.*",), layers=[0, 2], mode="merged")
    assert sorted(ad.names) == sorted(f"model.layers.{i}.mlp.{k}" for i in (0, 2)
                                      for k in ("gate_proj", "up_proj", "down_proj"))
    # untouched modules keep their frozen weights
    assert not m.get_submodule("model.layers.1.mlp.up_proj").weight.requires_grad
    with pytest.raises(UserError, match="No Linear"):
        SVDAdapter(build_tiny_model(), targets=("nope",))
    with pytest.raises(UserError, match=r"layers \[5\] do not exist .*layers 0\.\.1"):
        SVDAdapter(build_tiny_model(), layers=[1, 5])
    with pytest.raises(UserError, match="mode"):
        SVDAdapter(build_tiny_model(), mode="lora")


def test_svd_cache_hit(tmp_path):
    cache = str(tmp_path / "svd")
    a1 = SVDAdapter(build_tiny_model(seed=0), mode="merged", cache_dir=cache)
    M = len(a1.names)
    assert a1.svd_stats == {"svd_computed": M}
    files = os.listdir(cache)
    assert len(files) == M and all(f.startswith("svd-") and f.endswith(".safetensors") for f in files)
    a2 = SVDAdapter(build_tiny_model(seed=0), mode="merged", cache_dir=cache)
    assert a2.svd_stats == {"cache_hits": M}  # no SVD computed the second time
    for g1, g2 in zip(a1.groups, a2.groups):
        assert torch.equal(g1.U, g2.U) and torch.equal(g1.Vh, g2.Vh)
    # a different model (different W0 bytes) misses; a corrupted file is recomputed
    a3 = SVDAdapter(build_tiny_model(seed=1), mode="merged", cache_dir=cache)
    assert a3.svd_stats == {"svd_computed": M}
    victim = os.path.join(cache, sorted(files)[0])
    with open(victim, "wb") as f:
        f.write(b"garbage")
    with pytest.warns(UserWarning, match="unreadable"):
        a4 = SVDAdapter(build_tiny_model(seed=0), mode="merged", cache_dir=cache)
    assert a4.svd_stats == {"cache_hits": M - 1, "svd_computed": 1}
    assert not [f for f in os.listdir(cache) if f.endswith(".tmp")]


def test_knob_state_dict_round_trip(ids):
    m = build_tiny_model()
    ad = SVDAdapter(m, mode="merged")
    d = torch.randn(ad.R, generator=torch.Generator().manual_seed(5)) * 0.1
    _set_knob(ad, d)
    with torch.no_grad():
        want = m(ids).logits
    sd = ad.knob_state_dict()
    assert list(sd) == ad.names and all(v.dtype == torch.float32 for v in sd.values())
    ad.knob_state_dict()[ad.names[0]].add_(1.0)  # clones: editing them does not touch the knob
    assert torch.equal(ad.delta, d)

    m2 = build_tiny_model()
    ad2 = SVDAdapter(m2, mode="merged")
    ad2.load_knob_state_dict(sd)  # re-merges
    assert torch.equal(ad2.delta, ad.delta)
    with torch.no_grad():
        assert torch.equal(m2(ids).logits, want)

    with pytest.raises(UserError, match="missing"):
        ad2.load_knob_state_dict({k: v for k, v in sd.items() if k != ad.names[0]})
    with pytest.raises(UserError, match="unexpected"):
        ad2.load_knob_state_dict({**sd, "model.extra": torch.zeros(3)})
    bad = dict(sd)
    bad[ad.names[1]] = torch.zeros(ad.ranks[1] + 1)
    with pytest.raises(UserError, match="shape"):
        ad2.load_knob_state_dict(bad)
    assert torch.equal(ad2.delta, ad.delta)  # a rejected load changes nothing


def test_hack_knob_route(ids):
    (mm, am), (mf, af) = _pair(with_hack_knob=True)
    assert am.parameters() == [am.delta, am.delta_hack] and am.hack_enabled
    h = torch.randn(am.R, generator=torch.Generator().manual_seed(6)) * 0.05
    for ad in (am, af):
        _set_knob(ad, h, hack=True)
    with torch.no_grad():
        on_m, on_f = mm(ids).logits, mf(ids).logits
        am.hack_enabled = False  # re-merges without the hack knob
        af.hack_enabled = False
        assert torch.equal(mm(ids).logits, build_tiny_model()(ids).logits)
        assert torch.equal(mf(ids).logits, build_tiny_model()(ids).logits)
    assert torch.allclose(on_m, on_f, rtol=1e-4, atol=1e-5)
    am.hack_enabled = af.hack_enabled = True
    am.zero_grad()
    af.zero_grad()
    _loss(mm, ids).backward()
    _loss(mf, ids).backward()
    gm, gf = am.collect_grad(), af.collect_grad()
    torch.testing.assert_close(gm, gf, rtol=1e-4, atol=1e-6 * gf.abs().max().item())
    assert torch.equal(am.delta_hack.grad, gm) and torch.equal(af.delta_hack.grad, af.delta.grad)
    hs = am.knob_state_dict(hack=True)
    assert torch.equal(torch.cat([hs[n] for n in am.names]), h)
    with pytest.raises(UserError):
        SVDAdapter(build_tiny_model()).hack_enabled = True


@pytest.mark.parametrize("mode", ["merged", "factored"])
def test_bf16_model(mode, ids):
    m = build_tiny_model().to(torch.bfloat16)
    with torch.no_grad():
        base = m(ids).logits
    ad = SVDAdapter(m, mode=mode)
    assert all(g.U.dtype == torch.bfloat16 and g.Vh.dtype == torch.bfloat16 for g in ad.groups)
    assert ad.delta.dtype == torch.float32
    with torch.no_grad():
        assert torch.equal(m(ids).logits, base)
    _set_knob(ad, torch.full((ad.R,), 0.2))
    with torch.no_grad():
        out = m(ids).logits
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all() and not torch.equal(out, base)
    ad.zero_grad()
    _loss(m, ids).float().backward()
    g = ad.collect_grad()
    assert g.dtype == torch.float32 and torch.isfinite(g).all() and g.abs().max() > 0


def test_bf16_merged_close_to_factored(ids):
    mm, mf = build_tiny_model().to(torch.bfloat16), build_tiny_model().to(torch.bfloat16)
    am, af = SVDAdapter(mm, mode="merged"), SVDAdapter(mf, mode="factored")
    d = torch.randn(am.R, generator=torch.Generator().manual_seed(7)) * 0.2
    _set_knob(am, d)
    _set_knob(af, d)
    with torch.no_grad():
        lm, lf = mm(ids).logits.float(), mf(ids).logits.float()
    assert (lm - lf).abs().max() < 0.05 * lf.abs().max()


def test_to_device_keeps_parameter_and_views():
    m = build_tiny_model()
    ad = SVDAdapter(m, mode="merged")
    p = ad.delta
    assert ad.to("cpu") is ad and ad.delta is p
    g = ad.groups[0]
    assert g.linears[0].weight.data_ptr() == g.W[0].data_ptr()
    ad.merge()
    m.double()  # moving the model behind the adapter's back is caught, not silently wrong
    with pytest.raises(RuntimeError, match="adapter.to"):
        ad.merge()
    with pytest.raises(RuntimeError, match="adapter.to"):
        ad.collect_grad()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_merged_matches_factored(ids):
    (mm, am), (mf, af) = _pair()
    am.to("cuda")
    af.to("cuda")
    d = torch.randn(am.R, generator=torch.Generator().manual_seed(8)).cuda() * 0.05
    _set_knob(am, d)
    _set_knob(af, d)
    x = ids.cuda()
    am.zero_grad()
    af.zero_grad()
    _loss_cuda = lambda m: (m(x).logits.square().mean())
    _loss_cuda(mm).backward()
    _loss_cuda(mf).backward()
    gf = af.collect_grad()
    torch.testing.assert_close(am.collect_grad(), gf, rtol=1e-3, atol=1e-5 * gf.abs().max().item())
