"""v_hack extraction: the sign convention on the real tiny model (a known answer), the math on synthetic
gradients with planted directions, determinism, the held-out split, the file format and `pgrpo extract`."""
import json
import os
import subprocess
import sys

import pytest
import torch

from pgrpo import vhack
from pgrpo.adapter import SVDAdapter
from pgrpo.data.pairs import load_pairs, save_pairs
from pgrpo.errors import UserError
from pgrpo.model import ByteTokenizer, build_tiny_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny model's ops are too small for intra-op threads (see `pgrpo extract --threads`)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def pairs():
    return load_pairs()


@pytest.fixture(scope="module")
def few(pairs):
    """Four pairs of different styles/modes (run_tests, try_except, sentinel, file_marker)."""
    want = ["vacuous_print", "try_except", "sentinel", "file_marker"]
    return [next(p for p in pairs if p["style"] == s) for s in want]


def _unit_rows(k, r, gen):
    Q, _ = torch.linalg.qr(torch.randn(r, k, generator=gen, dtype=torch.float64))
    return Q.T.float()


# ----------------------------------------------------------------------------- sign convention


def test_sign_convention_known_answer(pairs):
    """D = g(hack) - g(clean) is the loss gradient of GRPO with A=+1 on the hack, -1 on the clean one:
    descending it raises log p(hack) - log p(clean). One-sided projection of a live gradient removes exactly
    that hack-ward part (the step then leaves the hack margin unchanged to first order) and leaves a
    gradient pointing the other way untouched; two-sided removes both."""
    model = build_tiny_model(seed=0)
    ad = SVDAdapter(model, mode="factored")
    tok = ByteTokenizer()
    p = next(q for q in pairs if q["style"] == "sentinel")
    gh = vhack.completion_grad(model, ad, tok, p["prompt"], p["hack"])
    gc = vhack.completion_grad(model, ad, tok, p["prompt"], p["clean"])
    D = gh - gc

    def margin():  # mean-token log p(hack) - log p(clean)
        return (vhack.completion_nll(model, ad, tok, p["prompt"], p["clean"])
                - vhack.completion_nll(model, ad, tok, p["prompt"], p["hack"]))

    def margin_after_descent(g, lr):
        with torch.no_grad():
            ad.delta.sub_(lr * g)
        m = margin()
        with torch.no_grad():
            ad.delta.zero_()
        return m

    V, S = vhack.fit_vhack(D[None], ad.names, ad.offsets, k=1, cut=0.0)
    assert set(V) == set(ad.names)
    for m, name in enumerate(ad.names):  # one pair: v_hack is D's own direction, oriented along +D
        Dm = D[ad.offsets[m]:ad.offsets[m + 1]]
        assert torch.nn.functional.cosine_similarity(V[name][0], Dm, dim=0) > 0.999

    # a live gradient = the hack-ward GRPO gradient plus a part orthogonal to v_hack in every module
    gen = torch.Generator().manual_seed(3)
    noise = torch.randn(ad.R, generator=gen)
    for m, name in enumerate(ad.names):
        a, b = ad.offsets[m], ad.offsets[m + 1]
        v = V[name][0]
        noise[a:b] -= (noise[a:b] @ v) * v
        noise[a:b] *= D[a:b].norm() / noise[a:b].norm()
    m0 = margin()
    lr = 0.05 / float(D.norm())
    g_hack = D + noise
    g_proj, stats = vhack.project(g_hack, V, ad.names, ad.ranks, one_sided=True)
    assert torch.allclose(g_proj, noise, atol=1e-6)           # exactly the hack-ward part went
    assert (stats[:, 1] > 0).all()                            # and it fired in every module
    up_raw = margin_after_descent(g_hack, lr) - m0
    up_proj = margin_after_descent(g_proj, lr) - m0
    assert up_raw > 0                                         # vanilla step: hack gets likelier
    assert abs(up_proj) < 0.05 * up_raw                       # projected step: ~no change (2nd order)

    g_anti = -D + noise                                       # a gradient whose step moves away from hacks
    g_keep, stats = vhack.project(g_anti, V, ad.names, ad.ranks, one_sided=True)
    assert torch.equal(g_keep, g_anti) and (stats[:, 1] == 0).all()
    assert margin_after_descent(g_anti, lr) - m0 < 0
    g_two, _ = vhack.project(g_anti, V, ad.names, ad.ranks, one_sided=False)
    assert torch.allclose(g_two, noise, atol=1e-6)


# ----------------------------------------------------------------------------- synthetic math


def _planted(n=40, names=("a", "b", "c"), ranks=(16, 24, 8), scale=(1.0, 2.0, 0.5), seed=0, pos=0.8):
    """D rows = c_i u_m + noise per module, with c_i > 0 for a `pos` fraction of the pairs."""
    gen = torch.Generator().manual_seed(seed)
    offsets = [0]
    for r in ranks:
        offsets.append(offsets[-1] + r)
    c = torch.rand(n, generator=gen) + 0.5
    c[int(pos * n):] *= -1
    U, cols = {}, []
    for name, r, s in zip(names, ranks, scale):
        u = _unit_rows(1, r, gen)[0]
        U[name] = u
        cols.append(s * (c[:, None] * u[None] + 0.15 * torch.randn(n, r, generator=gen)))
    return torch.cat(cols, 1), list(names), offsets, list(ranks), U


def test_fit_recovers_and_orients_planted_direction():
    D, names, offsets, ranks, U = _planted()
    V, S = vhack.fit_vhack(D, names, offsets, k=3, cut=0.0)
    for name in names:
        assert V[name].shape == (3, ranks[names.index(name)])
        assert torch.allclose(V[name] @ V[name].T, torch.eye(3), atol=1e-5)   # orthonormal rows
        assert float(V[name][0] @ U[name]) > 0.95                               # found AND oriented +
        assert (S[name][:-1] >= S[name][1:]).all()
    V2, _ = vhack.fit_vhack(-D, names, offsets, k=3, cut=0.0)                   # hack/clean swapped
    for name in names:
        assert float(V2[name][0] @ U[name]) < -0.95


def test_contrast_steers_away_from_generic_directions():
    """Hack-vs-clean gradients = small planted hack direction u + a large generic direction w whose
    coefficient differs between the two completions (so w survives in D too). Plain SVD picks w;
    contrastive PCA against non-hack contrasts (which carry w but not u) picks u."""
    gen = torch.Generator().manual_seed(0)
    n, r = 60, 16
    u, w = _unit_rows(2, r, gen)
    gh = 0.5 * u + 3.0 * torch.randn(n, 1, generator=gen) * w + 0.05 * torch.randn(n, r, generator=gen)
    gc = -0.5 * u + 3.0 * torch.randn(n, 1, generator=gen) * w + 0.05 * torch.randn(n, r, generator=gen)
    D = gh - gc
    fit = list(range(n))
    N = vhack.contrast_rows(gh, gc, fit, seed=0)
    assert N.shape == (2 * n, r)
    V0, _ = vhack.fit_vhack(D, ["m"], [0, r], k=1, cut=0.0)
    Vc, _ = vhack.fit_vhack(D, ["m"], [0, r], k=1, cut=0.0, N=N, contrast=2.0)
    assert abs(float(V0["m"][0] @ w)) > 0.9                  # the SVD of D is dominated by the generic w
    assert float(Vc["m"][0] @ u) > 0.95                      # the contrast finds the hack direction, oriented +
    assert torch.allclose(Vc["m"] @ Vc["m"].T, torch.eye(1), atol=1e-5)
    V00, _ = vhack.fit_vhack(D, ["m"], [0, r], k=1, cut=0.0, N=N, contrast=0.0)
    assert torch.equal(V00["m"], V0["m"])                    # contrast 0 is exactly the plain SVD


def test_contrast_rows_never_pair_a_completion_with_itself():
    GH = torch.arange(10.0)[:, None].repeat(1, 3)
    GC = 100 + GH
    N = vhack.contrast_rows(GH, GC, [1, 3, 4, 7, 9], seed=5)
    assert N.shape == (10, 3) and (N != 0).all()
    assert vhack.contrast_rows(GH, GC, [2], seed=0).shape == (0, 3)


def test_orient_majority_vote_not_sum():
    """3 pairs project slightly positive and 1 strongly negative: the vote says +."""
    v = torch.tensor([[1.0, 0.0]])
    Dm = torch.tensor([[0.1, 1.0], [0.1, -1.0], [0.2, 0.0], [-5.0, 0.0]])
    assert vhack.orient(v, Dm)[0, 0] == 1.0
    assert vhack.orient(-v, Dm)[0, 0] == 1.0


def test_noise_floor_cut_on_synthetic_singular_values():
    S = {"a": torch.tensor([10.0, 5.0, 1.0]), "b": torch.tensor([0.5, 0.2]), "c": torch.tensor([3.0, 2.0])}
    assert vhack.noise_floor_cut(S, 0.0) == {"a": 3, "b": 2, "c": 2}
    assert vhack.noise_floor_cut(S, 0.25) == {"a": 3, "b": 1, "c": 2}        # floor(0.25*7)=1: 0.2 goes
    assert vhack.noise_floor_cut(S, 0.5) == {"a": 2, "b": 0, "c": 2}         # 0.2, 0.5, 1.0 go: b is empty
    with pytest.raises(UserError):
        vhack.noise_floor_cut(S, 1.0)
    # through fit_vhack: a module whose gradients are tiny loses everything and is dropped
    D, names, offsets, ranks, _ = _planted(scale=(1.0, 1.0, 1e-4))
    V, S2 = vhack.fit_vhack(D, names, offsets, k=2, cut=0.34)
    assert set(V) == {"a", "b"} and all(v.shape[0] == 2 for v in V.values())


def test_zero_singular_values_are_never_kept():
    """Two pairs span at most two directions per module: k=4 with no cut still keeps only those, and a
    module whose D is exactly zero (e.g. not reached by the loss) is dropped."""
    D, names, offsets, ranks, _ = _planted(n=2)
    D[:, offsets[2]:offsets[3]] = 0
    V, S = vhack.fit_vhack(D, names, offsets, k=4, cut=0.0)
    assert set(V) == {"a", "b"} and all(v.shape[0] == 2 for v in V.values())


def test_heldout_split_is_disjoint_seeded_and_complete():
    for n in (2, 5, 72):
        for seed in range(5):
            fit, held = vhack.split_pairs(n, 0.2, seed)
            assert not set(fit) & set(held)
            assert sorted(fit + held) == list(range(n))
            assert len(held) == max(1, round(0.2 * n)) and fit
            assert (fit, held) == vhack.split_pairs(n, 0.2, seed)
    assert vhack.split_pairs(72, 0.2, 0) != vhack.split_pairs(72, 0.2, 1)
    assert vhack.split_pairs(10, 0.0, 0) == (list(range(10)), [])


def test_heldout_split_by_problem_never_shares_a_problem():
    from pgrpo.data.pairs import load_pairs
    pids = [p["problem_id"] for p in load_pairs()]
    for seed in range(5):
        fit, held = vhack.split_pairs(len(pids), 0.2, seed, groups=pids)
        assert fit and held and sorted(fit + held) == list(range(len(pids)))
        assert not {pids[i] for i in fit} & {pids[i] for i in held}
        assert abs(len(held) - 0.2 * len(pids)) <= 3


def test_heldout_report_beats_null_on_planted_direction():
    D, names, offsets, ranks, _ = _planted(n=60, pos=1.0)
    fit, held = vhack.split_pairs(60, 0.25, 0)
    V, _ = vhack.fit_vhack(D[fit], names, offsets, k=2, cut=0.0)
    real = vhack.evaluate(D[held], D[fit], V, names, offsets)
    null = vhack.evaluate(D[held], D[fit], vhack.random_vhack(V, D[fit], names, offsets, 0), names, offsets)
    assert real["accuracy"] == 1.0 and real["n_pairs"] == 15
    assert real["mean_cosine"] > 0.6 and real["mean_cosine"] > null["mean_cosine"] + 0.3
    assert real["removed_fraction"] > null["removed_fraction"] + 0.3


def test_collateral_known_answer():
    """g(hack) = +u/2 + generic, g(clean) = -u/2 + generic' with the generic parts orthogonal to u: with
    V = u, penalizing the hack or reinforcing the clean loses nothing, nor do zero-sum non-hack contrasts."""
    gen = torch.Generator().manual_seed(0)
    r, n = 12, 6
    u = _unit_rows(1, r, gen)
    P = torch.eye(r) - u.T @ u
    GH = 0.5 * u + torch.randn(n, r, generator=gen) @ P
    GC = -0.5 * u + torch.randn(n, r, generator=gen) @ P
    c = vhack.collateral(GH, GC, list(range(n)), GH - GC, {"m": u}, ["m"], [0, r], seed=0)
    for key in ("penalize_hack", "reinforce_clean", "clean_vs_clean", "hack_vs_hack"):
        assert c[key]["removed_fraction"] == pytest.approx(0.0, abs=1e-6), key
    expect = (0.5 / GH.norm(dim=1)).mean()
    assert c["reinforce_hack"]["removed_fraction"] == pytest.approx(float(expect), rel=1e-5)
    assert c["penalize_clean"]["removed_fraction"] == pytest.approx(float((0.5 / GC.norm(dim=1)).mean()), rel=1e-5)


def test_vhack_overlap():
    gen = torch.Generator().manual_seed(0)
    A = {"a": _unit_rows(3, 10, gen), "b": _unit_rows(2, 6, gen)}
    assert vhack.vhack_overlap(A, A) == pytest.approx(1.0)
    R = torch.linalg.qr(torch.randn(3, 3, generator=gen))[0].float()             # rotate within the span
    B = {"a": R @ A["a"], "b": -A["b"]}
    assert vhack.vhack_overlap(A, B) == pytest.approx(1.0, abs=1e-5)
    Q = torch.linalg.qr(torch.randn(10, 10, generator=gen, dtype=torch.float64))[0].T.float()
    assert vhack.vhack_overlap({"a": Q[:3]}, {"a": Q[3:6]}) == pytest.approx(0.0, abs=1e-6)
    assert vhack.vhack_overlap(A, {"a": A["a"]}) == pytest.approx(0.5)          # b missing counts 0


def test_save_load_round_trip(tmp_path):
    gen = torch.Generator().manual_seed(0)
    V = {"model.layers.0.mlp.up_proj": _unit_rows(2, 8, gen), "model.layers.0.self_attn.q_proj": _unit_rows(1, 4, gen)}
    S = {n: torch.rand(v.shape[0], generator=gen) for n, v in V.items()}
    path = tmp_path / "sub" / "v.safetensors"
    vhack.save_vhack(path, V, S, {"k": 2, "model": "tiny", "pairs_sha256": "ab" * 32})
    V2, S2, meta = vhack.load_vhack(path)
    assert list(V2) == list(V) and all(torch.equal(V[n], V2[n]) and torch.equal(S[n], S2[n]) for n in V)
    assert meta["k"] == "2" and meta["model"] == "tiny" and meta["pairs_sha256"] == "ab" * 32
    assert os.listdir(path.parent) == ["v.safetensors"]                        # no temp file left
    with pytest.raises(UserError, match="not found"):
        vhack.load_vhack(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(UserError, match="not a readable v_hack file"):
        vhack.load_vhack(tmp_path / "junk.safetensors")


# ----------------------------------------------------------------------------- on the tiny model


def test_extraction_deterministic_and_modes_agree(few):
    def run(mode):
        model = build_tiny_model(seed=0)
        ad = SVDAdapter(model, mode=mode)
        return vhack.run_extraction(model, ad, ByteTokenizer(), few, k=2, cut=0.25, heldout=0.25, seed=0,
                                    max_tokens=384)

    a, b, f = run("merged"), run("merged"), run("factored")
    assert a.held_idx == b.held_idx and not set(a.held_idx) & set(a.fit_idx) and len(a.held_idx) == 1
    assert list(a.V) == list(b.V) and all(torch.equal(a.V[n], b.V[n]) for n in a.V)
    assert json.dumps(a.report) == json.dumps(b.report)
    assert list(f.V) == list(a.V)
    assert all(torch.allclose(a.V[n], f.V[n], atol=1e-4) for n in a.V)
    kept = sum(v.shape[0] for v in a.V.values())
    assert kept == 28 - 7                                                       # 14 modules x k=2, cut 25%


def test_refresh_extraction_sees_quarantine_knob_off(few):
    """Route arm: extract_vhack at delta with delta_hack != 0 equals extraction without the hack knob,
    and the adapter is left as found (hack knob on, weights re-merged)."""
    gen = torch.Generator().manual_seed(0)
    m1 = build_tiny_model(seed=0)
    a1 = SVDAdapter(m1, mode="merged", with_hack_knob=True)
    with torch.no_grad():
        a1.delta.copy_(0.05 * torch.randn(a1.R, generator=gen))
        a1.delta_hack.copy_(0.5 * torch.randn(a1.R, generator=gen))
    a1.merge()
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        before = m1(ids).logits
    V1 = vhack.extract_vhack(m1, a1, ByteTokenizer(), few[:2], k=2, cut=0.0, max_tokens=384)
    assert a1.hack_enabled
    with torch.no_grad():
        assert torch.equal(m1(ids).logits, before)
    m2 = build_tiny_model(seed=0)
    a2 = SVDAdapter(m2, mode="merged")
    with torch.no_grad():
        a2.delta.copy_(a1.delta)
    V2 = vhack.extract_vhack(m2, a2, ByteTokenizer(), few[:2], k=2, cut=0.0, max_tokens=384)
    assert all(torch.allclose(V1[n], V2[n], atol=1e-5) for n in V2)
    assert vhack.vhack_overlap(V1, V2) == pytest.approx(1.0, abs=1e-4)


def test_extract_cli_writes_report_and_caches(tmp_path, few, capsys):
    cfg = tmp_path / "job.yaml"
    cfg.write_text("model: {name: tiny}\nadapter: {svd_cache_dir: null}\ndevice: cpu\n")
    pf = tmp_path / "pairs.json"
    save_pairs(few, pf)
    out = tmp_path / "v" / "vhack.safetensors"
    out.parent.mkdir()   # an output file's directory must exist (checked before any work)
    args = ["--config", str(cfg), "--out", str(out), "--pairs", str(pf), "--max-tokens", "384", "--heldout", "0.25"]
    # end to end through the real command once
    p = subprocess.run([sys.executable, "-m", "pgrpo", "extract"] + args + ["--k", "2"],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    rep = json.loads((tmp_path / "v" / "vhack.report.json").read_text())
    assert rep["n_fit"] == 3 and rep["n_heldout"] == 1 and not set(rep["fit_pairs"]) & set(rep["heldout_pairs"])
    assert {"accuracy", "mean_cosine", "removed_fraction"} <= set(rep["heldout"]) and rep["null"]["n_pairs"] == 1
    assert sorted(rep["leave_one_style_out"]) == sorted(p["style"] for p in few)
    V, S, meta = vhack.load_vhack(out)
    assert meta["k"] == "2" and meta["model"] == "tiny" and meta["pairs_sha256"] == vhack.sha256_file(pf)
    assert all(v.shape[0] <= 2 for v in V.values()) and "random null" in p.stdout

    # the same function in-process (what `pgrpo extract` dispatches to): cache hit, then a miss on k
    mtime = os.path.getmtime(out)
    assert vhack.cli(args + ["--k", "2"]) == 0
    assert "up to date" in capsys.readouterr().out and os.path.getmtime(out) == mtime
    assert vhack.cli(args + ["--k", "1"]) == 0
    assert "up to date" not in capsys.readouterr().out
    assert vhack.load_vhack(out)[2]["k"] == "1"
    with pytest.raises(UserError, match="--cut must be in"):
        vhack.cli(args + ["--cut", "1.5"])


# ----------------------------------------------------------------------------- issue 11: context, normalisation, nulls


class _ThinkTok(ByteTokenizer):
    """A byte tokenizer whose chat template behaves like Qwen3's: enable_thinking=False renders an empty think
    block, so the two settings give different prompt strings (the trainer renders with False)."""

    def apply_chat_template(self, messages, add_generation_prompt=True, tokenize=False, enable_thinking=True, **kw):
        text = super().apply_chat_template(messages, add_generation_prompt, tokenize=False)
        if add_generation_prompt and not enable_thinking:
            text += "<think>\n\n</think>\n\n"
        return self.encode(text) if tokenize else text


def test_extraction_renders_prompts_exactly_like_the_trainer():
    from pgrpo.rollout import encode_prompt
    tok = _ThinkTok()
    msgs = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]
    for think in (False, True):
        p_ids, c_ids = vhack.pair_ids(tok, msgs, "abc", enable_thinking=think)
        assert p_ids == encode_prompt(tok, msgs, think)
        assert c_ids == tok.encode("abc") + [tok.eos_token_id]
    assert vhack.pair_ids(tok, msgs, "abc", enable_thinking=False)[0] != vhack.pair_ids(tok, msgs, "abc", enable_thinking=True)[0]


def test_per_pair_normalisation_gives_each_pair_one_vote():
    gen = torch.Generator().manual_seed(0)
    r = 12
    a = torch.zeros(r)
    a[0] = 1.0
    b = torch.zeros(r)
    b[1] = 1.0
    D = torch.stack([a + 0.05 * torch.randn(r, generator=gen) for _ in range(10)] + [100 * b])
    names, offs = ["m"], [0, r]
    V_raw, _ = vhack.fit_vhack(D, names, offs, k=1, cut=0.0)
    V_n, _ = vhack.fit_vhack(vhack.normalize_rows(D), names, offs, k=1, cut=0.0)
    assert abs(float(V_raw["m"][0] @ b)) > 0.99                  # the one large pair decides the raw SVD
    assert float(V_n["m"][0] @ a) > 0.99                          # normalised: the ten pairs' shared direction
    assert torch.allclose(vhack.normalize_rows(D).norm(dim=1), torch.ones(11))
    assert vhack.normalize_rows(torch.zeros(2, 3)).abs().sum() == 0


def _synthetic_grads(planted: bool, n=24, r=40, seed=0):
    """Per-completion gradients in 2 modules: a large generic part in a 3-dim span shared by hack and clean texts,
    plus (planted=True) a hack-only direction h in every hack gradient."""
    gen = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(2 * r, 5, generator=gen))[0].T       # 3 generic + h + spare
    def generic():
        return (torch.randn(n, 3, generator=gen) * torch.tensor([3.0, 2.0, 1.0])) @ basis[:3] \
            + 0.05 * torch.randn(n, 2 * r, generator=gen)
    GC, GH = generic(), generic()
    if planted:
        GH = GH + 6.0 * basis[3]
    return GH, GC, ["m0", "m1"], [0, r, 2 * r]


@pytest.mark.parametrize("planted", [True, False])
def test_nulls_can_beat_a_fake(planted):
    """With a real hack direction v_hack beats every null; when hack and clean gradients differ only by generic
    noise (a 'v_hack' that is just the gradients' main directions) the generic-gradient null is as good, so
    `beats` is False for it. The random null is drawn in the gradients' span and oriented by coin flips."""
    GH, GC, names, offs = _synthetic_grads(planted)
    D = vhack.normalize_rows(GH - GC)
    fit, held = list(range(16)), list(range(16, 24))
    V, _ = vhack.fit_vhack(D[fit], names, offs, k=1, cut=0.0)
    real = vhack.evaluate(D[held], D[fit], V, names, offs)
    nulls = {"random": vhack.anisotropic_null(V, torch.cat([GH[fit], GC[fit]]), names, offs, 0),
             "generic": vhack.generic_null(V, vhack.contrast_rows(GH, GC, fit, 0), names, offs, 0)}
    beats = {}
    for key, Vn in nulls.items():
        ev = vhack.evaluate(D[held], D[fit], Vn, names, offs)
        beats[key] = vhack.compare(real, ev)["beats"]
        for name in Vn:                                           # orthonormal rows, k matched
            assert Vn[name].shape == V[name].shape
            assert torch.allclose(Vn[name] @ Vn[name].T, torch.eye(V[name].shape[0]), atol=1e-5)
    if planted:
        assert beats == {"random": True, "generic": True}
    else:
        assert beats["generic"] is False
