"""The gradient ops: extension kernels vs their pure-torch twins, opcheck, input validation, fallback.

The extension is built by `make setup` (CI builds it with FORCE_CUDA=1), so these tests expect
`pgrpo._C` to import; CUDA parity tests run only where a GPU is present.
"""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from pgrpo import ops

GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
DEVICES = ["cpu", pytest.param("cuda", marks=GPU)]


def test_extension_is_built():
    assert ops.HAVE_EXTENSION, f"pgrpo._C did not import ({ops._EXT_MISSING_WHY}); run `make setup`"
    assert hasattr(torch.ops.pgrpo, "svd_grad_project")


# ----------------------------------------------------------------------------- helpers

def stack(L, o, i, r, dtype=torch.float32, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    G = torch.randn(L, o, i, generator=gen)
    U = torch.randn(L, o, r, generator=gen) / o ** 0.5
    Vh = torch.randn(L, r, i, generator=gen) / i ** 0.5
    return [t.to(device=device, dtype=dtype) for t in (G, U, Vh)]


def orthonormal_rows(k, r, gen):
    q, _ = torch.linalg.qr(torch.randn(r, k, generator=gen, dtype=torch.float64))
    return q.T.float().contiguous()  # [k, r], orthonormal rows


def ragged(rs, ks, device="cpu", seed=0):
    """Flat g for modules with ranks rs, packed v_hack with ks rows each (k=0: no v_hack)."""
    gen = torch.Generator().manual_seed(seed)
    names = [f"m{j}" for j in range(len(rs))]
    vh = {n: orthonormal_rows(k, r, gen) for n, r, k in zip(names, rs, ks) if k > 0}
    packed = ops.pack_vhack(names, rs, vh, device=device)
    g = torch.randn(sum(rs), generator=gen).to(device)
    g_offsets = torch.tensor([0] + list(torch.tensor(rs).cumsum(0).tolist()), dtype=torch.int64, device=device)
    return g, g_offsets, packed, vh


RAGGED_RS = [5, 17, 1, 64, 33, 12, 40]
RAGGED_KS = [0, 1, 1, 12, 12, 0, 3]


# ----------------------------------------------------------------------------- basis change

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(3, 24, 16, 16), (2, 9, 40, 9), (1, 70, 130, 70), (4, 5, 3, 3)])
def test_basis_change_matches_twin(device, dtype, shape):
    G, U, Vh = stack(*shape, dtype=dtype, device=device, seed=sum(shape))
    ref = ops.basis_change_torch(G, U, Vh)
    out = torch.ops.pgrpo.basis_change(G, U, Vh)
    assert out.dtype == torch.float32 and out.shape == (shape[0], shape[3])
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ops.basis_change(G, U, Vh), ref, rtol=1e-4, atol=1e-4)


def test_basis_change_is_the_diagonal_of_the_full_product():
    G, U, Vh = stack(3, 20, 12, 12, dtype=torch.float64)
    expect = torch.diagonal(U.transpose(1, 2) @ G @ Vh.transpose(1, 2), dim1=1, dim2=2)
    out = ops.basis_change(G.float(), U.float(), Vh.float())
    torch.testing.assert_close(out, expect.float(), rtol=1e-4, atol=1e-5)


def test_basis_change_in_chunks_of_modules_matches(tmp_path):
    """A stack larger than the T = G Vh^T scratch budget is done a few modules at a time."""
    script = textwrap.dedent("""
        import torch
        from pgrpo import ops
        gen = torch.Generator().manual_seed(0)
        for dtype in (torch.float32, torch.bfloat16):
            G, U, Vh = (torch.randn(*s, generator=gen).to(dtype) for s in ((7, 50, 30), (7, 50, 20), (7, 20, 30)))
            torch.testing.assert_close(torch.ops.pgrpo.basis_change(G, U, Vh), ops.basis_change_torch(G, U, Vh),
                                       rtol=1e-4, atol=1e-4)
            g, st = torch.ops.pgrpo.svd_grad_project(G, U, Vh, torch.zeros(0), torch.zeros(8, dtype=torch.int64),
                                                     torch.zeros(7, dtype=torch.int64), 1.0, True)
            torch.testing.assert_close(g, ops.basis_change_torch(G, U, Vh), rtol=1e-4, atol=1e-4)
        print("ok")
    """)
    env = dict(os.environ, PGRPO_BASIS_CHUNK_BYTES=str(2 * 50 * 20 * 4 + 1))  # 2 modules per GEMM
    out = subprocess.run([sys.executable, "-c", script], env=env, check=True, timeout=120,
                         capture_output=True, text=True)
    assert out.stdout.strip() == "ok"


# ----------------------------------------------------------------------------- projection

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("one_sided", [True, False])
@pytest.mark.parametrize("overshoot", [1.0, 1.7, 0.5])
def test_project_matches_twin_ragged(device, one_sided, overshoot):
    g, go, p, _ = ragged(RAGGED_RS, RAGGED_KS, device=device, seed=int(overshoot * 10) + one_sided)
    g_ref = g.clone()
    st_ref = ops.project_torch_(g_ref, go, p.v, p.v_offsets, p.ks, overshoot, one_sided)
    st = torch.ops.pgrpo.project_(g, go, p.v, p.v_offsets, p.ks, overshoot, one_sided)
    torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(st, st_ref, rtol=1e-5, atol=1e-5)
    # k = 0 modules pass through untouched and report nothing removed
    fresh, _, _, _ = ragged(RAGGED_RS, RAGGED_KS, device=device, seed=int(overshoot * 10) + one_sided)
    assert torch.equal(g[:5], fresh[:5]) and st[0, 1].item() == 0.0 and st[5, 1].item() == 0.0


@pytest.mark.parametrize("one_sided", [True, False])
def test_project_semantics(one_sided):
    """Independent of the twin: two-sided leaves V g = 0; one-sided leaves V g <= 0 and keeps
    the negative coefficients; stats are (||g||, ||g - g'||)."""
    rs, ks = [64, 48, 30], [12, 1, 5]
    g, go, p, vh = ragged(rs, ks, seed=3)
    before = g.clone()
    stats = ops.project_(g, go, p.v, p.v_offsets, p.ks, 1.0, one_sided)
    for m, (a, b) in enumerate(zip(go[:-1].tolist(), go[1:].tolist())):
        V = vh[f"m{m}"]
        c0, c1 = V @ before[a:b], V @ g[a:b]
        if one_sided:
            torch.testing.assert_close(c1, torch.where(c0 > 0, 0.0, c0), atol=1e-5, rtol=0)
        else:
            torch.testing.assert_close(c1, torch.zeros_like(c1), atol=1e-5, rtol=0)
        assert stats[m, 0].item() == pytest.approx(before[a:b].norm().item(), rel=1e-5)
        assert stats[m, 1].item() == pytest.approx((before[a:b] - g[a:b]).norm().item(), rel=1e-4, abs=1e-6)


def test_project_handles_many_modules_with_k_up_to_r():
    rs = [int(x) for x in torch.randint(1, 90, (120,), generator=torch.Generator().manual_seed(1))]
    ks = [min(r, k) for r, k in zip(rs, [0, 1, 12, 4] * 30)]
    g, go, p, _ = ragged(rs, ks, seed=5)
    g_ref = g.clone()
    st_ref = ops.project_torch_(g_ref, go, p.v, p.v_offsets, p.ks, 1.3, True)
    st = ops.project_(g, go, p.v, p.v_offsets, p.ks, 1.3, True)
    torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(st, st_ref, rtol=1e-5, atol=1e-5)


def test_project_large_stack_takes_the_multithreaded_path():
    """>= 1M floats of work switches the CPU kernel to OpenMP over modules; same answer."""
    rs, ks = [512] * 64 + [300] * 30, [32] * 64 + [0, 7, 32] * 10
    g, go, p, _ = ragged(rs, ks, seed=9)
    assert p.v.numel() + 2 * g.numel() >= 1 << 20
    g_ref = g.clone()
    st_ref = ops.project_torch_(g_ref, go, p.v, p.v_offsets, p.ks, 1.1, True)
    st = ops.project_(g, go, p.v, p.v_offsets, p.ks, 1.1, True)
    torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(st, st_ref, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- fused

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("one_sided,overshoot", [(True, 1.0), (False, 1.5)])
def test_fused_equals_basis_change_then_project(device, dtype, one_sided, overshoot):
    L, o, i, r = 5, 40, 24, 24
    G, U, Vh = stack(L, o, i, r, dtype=dtype, device=device, seed=7)
    gen = torch.Generator().manual_seed(8)
    ks = [0, 1, 12, 3, 12]
    p = ops.pack_vhack([f"m{l}" for l in range(L)], [r] * L,
                       {f"m{l}": orthonormal_rows(k, r, gen) for l, k in enumerate(ks) if k}, device=device)
    g, stats = ops.svd_grad_project(G, U, Vh, p.v, p.v_offsets, p.ks, overshoot, one_sided)
    g2 = ops.basis_change(G, U, Vh)
    go = torch.arange(0, (L + 1) * r, r, device=device)
    st2 = ops.project_(g2.view(-1), go, p.v, p.v_offsets, p.ks, overshoot, one_sided)
    torch.testing.assert_close(g, g2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stats, st2, rtol=1e-5, atol=1e-5)
    g3, st3 = ops.svd_grad_project_torch(G, U, Vh, p.v, p.v_offsets, p.ks, overshoot, one_sided)
    torch.testing.assert_close(g, g3, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(stats, st3, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- opcheck

@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    G, U, Vh = stack(3, 12, 8, 8, device=device)
    torch.library.opcheck(torch.ops.pgrpo.basis_change.default, (G, U, Vh))
    Gb, Ub, Vhb = (t.bfloat16() for t in (G, U, Vh))
    torch.library.opcheck(torch.ops.pgrpo.basis_change.default, (Gb, Ub, Vhb))
    g, go, p, _ = ragged([8, 5, 9], [3, 0, 1], device=device)
    torch.library.opcheck(torch.ops.pgrpo.project_.default, (g, go, p.v, p.v_offsets, p.ks, 1.2, True))
    _, _, p3, _ = ragged([8, 8, 8], [2, 0, 8], device=device)
    torch.library.opcheck(torch.ops.pgrpo.svd_grad_project.default, (G, U, Vh, p3.v, p3.v_offsets, p3.ks, 1.0, False))


# ----------------------------------------------------------------------------- invalid inputs

def test_basis_change_rejects_bad_inputs():
    G, U, Vh = stack(2, 6, 5, 5)
    for fn in (ops.basis_change, torch.ops.pgrpo.basis_change):
        with pytest.raises(ValueError, match="shape mismatch"):
            fn(G, U[:, :5], Vh)
        with pytest.raises(ValueError, match="shape mismatch"):
            fn(G, U, Vh[:1])
        with pytest.raises(ValueError, match="3-D"):
            fn(G[0], U, Vh)
        with pytest.raises(ValueError, match="dtype"):
            fn(G, U.bfloat16(), Vh)
        with pytest.raises(ValueError, match="dtype"):
            fn(G.double(), U.double(), Vh.double())
    with pytest.raises(ValueError, match="device"):
        ops.basis_change(G, U.to("meta"), Vh)


def test_project_rejects_bad_inputs_without_touching_g():
    g, go, p, _ = ragged([8, 5, 9], [3, 0, 1])
    keep = g.clone()
    bad_go = go.clone(); bad_go[1] = 100          # offsets past the end / decreasing
    short_vo = p.v_offsets.clone(); short_vo[1] -= 1  # v block too small for k * r
    cases = [
        ((g, go[:-1], p.v, p.v_offsets, p.ks), "M\\+1 entries"),
        ((g, bad_go, p.v, p.v_offsets, p.ks), "non-decreasing|end at g.numel"),
        ((g, go, p.v, short_vo, p.ks), "must be"),
        ((g, go, p.v[:-1], p.v_offsets, p.ks), "end at v.numel"),
        ((g, go, p.v, p.v_offsets, -p.ks), ">= 0|must be"),
        ((g.double(), go, p.v, p.v_offsets, p.ks), "float32"),
        ((g, go.int(), p.v, p.v_offsets, p.ks), "int64"),
        ((g[::2], go, p.v, p.v_offsets, p.ks), "contiguous"),
        ((g, go, p.v.to("meta"), p.v_offsets, p.ks), "device"),
    ]
    for fn in (ops.project_, torch.ops.pgrpo.project_):
        for args, msg in cases:
            if fn is torch.ops.pgrpo.project_ and args[2].device.type == "meta":
                continue  # the dispatcher rejects mixed devices itself; the Python face says why
            with pytest.raises(ValueError, match=msg):
                fn(*args, 1.0, True)
            assert torch.equal(g, keep)
    with pytest.raises(ValueError, match="overshoot"):
        ops.project_(g, go, p.v, p.v_offsets, p.ks, float("nan"), True)


def test_svd_grad_project_rejects_bad_inputs():
    G, U, Vh = stack(3, 8, 6, 6)
    _, _, p, _ = ragged([6, 6, 6], [2, 0, 1])
    for fn in (ops.svd_grad_project, torch.ops.pgrpo.svd_grad_project):
        with pytest.raises(ValueError, match="one k per module"):
            fn(G, U, Vh, p.v, p.v_offsets, p.ks[:2], 1.0, True)
        with pytest.raises(ValueError, match="shape mismatch"):
            fn(G, U[:, :, :5], Vh, p.v, p.v_offsets, p.ks, 1.0, True)
        short = p.v_offsets.clone(); short[-1] -= 1
        with pytest.raises(ValueError, match="v_offsets"):
            fn(G, U, Vh, p.v, short, p.ks, 1.0, True)
    with pytest.raises(ValueError, match="int64"):
        ops.svd_grad_project(G, U, Vh, p.v, p.v_offsets.int(), p.ks, 1.0, True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_project_rejects_non_finite_g(device, bad):
    g, go, p, _ = ragged([8, 5, 9], [3, 0, 1], device=device)
    g[10] = bad
    keep = g.clone()
    for fn in (ops.project_, torch.ops.pgrpo.project_):
        with pytest.raises(ValueError, match="non-finite"):
            fn(g, go, p.v, p.v_offsets, p.ks, 1.0, True)
        assert torch.equal(g.isnan(), keep.isnan()) and torch.equal(g.nan_to_num(), keep.nan_to_num())
    G, U, Vh = stack(3, 8, 8, 8, device=device)
    G[1, 2, 3] = bad  # a bad weight gradient surfaces as non-finite g in the fused op
    _, _, p3, _ = ragged([8, 8, 8], [3, 0, 1], device=device)
    with pytest.raises(ValueError, match="non-finite"):
        ops.svd_grad_project(G, U, Vh, p3.v, p3.v_offsets, p3.ks, 1.0, True)


# ----------------------------------------------------------------------------- fallback

def test_fallback_without_extension_warns_once_and_matches(tmp_path):
    """With the extension disabled the public ops run on the twins, warn once, and agree."""
    G, U, Vh = stack(3, 10, 7, 7, seed=11)
    g, go, p, _ = ragged([7, 7, 7], [2, 0, 7], seed=12)
    torch.save({"G": G, "U": U, "Vh": Vh, "g": g, "go": go, "v": p.v, "vo": p.v_offsets, "ks": p.ks},
               tmp_path / "in.pt")
    script = textwrap.dedent(f"""
        import warnings, torch
        warnings.simplefilter("always")
        with warnings.catch_warnings(record=True) as w:
            from pgrpo import ops
            d = torch.load({str(tmp_path / 'in.pt')!r})
            bc = ops.basis_change(d["G"], d["U"], d["Vh"])
            bc = ops.basis_change(d["G"], d["U"], d["Vh"])
            st = ops.project_(d["g"], d["go"], d["v"], d["vo"], d["ks"], 1.5, False)
            fg, fst = ops.svd_grad_project(d["G"], d["U"], d["Vh"], d["v"], d["vo"], d["ks"], 1.0, True)
            try:
                bad = d["g"].clone(); bad[0] = float("nan")
                ops.project_(bad, d["go"], d["v"], d["vo"], d["ks"], 1.0, True)
                err = ""
            except ValueError as e:
                err = str(e)
        msgs = [str(x.message) for x in w if "pgrpo._C" in str(x.message)]
        torch.save({{"have": ops.HAVE_EXTENSION, "msgs": msgs, "bc": bc, "g": d["g"], "st": st,
                    "fg": fg, "fst": fst, "err": err}}, {str(tmp_path / 'out.pt')!r})
    """)
    env = dict(os.environ, PGRPO_DISABLE_EXT="1")
    subprocess.run([sys.executable, "-c", script], env=env, check=True, timeout=120)
    out = torch.load(tmp_path / "out.pt")
    assert out["have"] is False
    assert len(out["msgs"]) == 1 and "pure-torch" in out["msgs"][0]
    assert "non-finite" in out["err"]
    torch.testing.assert_close(out["bc"], ops.basis_change(G, U, Vh), rtol=1e-5, atol=1e-5)
    st = ops.project_(g, go, p.v, p.v_offsets, p.ks, 1.5, False)
    torch.testing.assert_close(out["g"], g, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["st"], st, rtol=1e-5, atol=1e-5)
    fg, fst = ops.svd_grad_project(G, U, Vh, p.v, p.v_offsets, p.ks, 1.0, True)
    torch.testing.assert_close(out["fg"], fg, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["fst"], fst, rtol=1e-5, atol=1e-5)
