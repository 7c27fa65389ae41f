"""bf16 fidelity of the merged adapter: 10 GRPO steps merged vs factored on the real tiny Qwen3 in bf16 (CPU).

Both bf16 paths lose knob updates below half an ulp (merged: in W0 + U diag(dS) Vh; factored: in the bf16 add of
the correction to x W0^T), so the reference is the same run in fp32. Stated tolerances (tests below):
- merged vs factored, both bf16, every step: cos(delta_S) >= 0.99, | ||d_m|| / ||d_f|| - 1 | <= 0.02;
- against the fp32 run, merged is no less faithful than factored: its delta_S error and its logit error (on a
  fixed probe batch, relative to how far the fp32 logits moved from the base model) are at most 1.15x the
  factored path's, at every step.
"""
import pytest
import torch

from pgrpo import grpo
from pgrpo.adapter import SVDAdapter, _stochastic_round_bf16
from pgrpo.config import ArmConfig
from pgrpo.model import build_tiny_model
from pgrpo.rollout import Group, micro_batches

PAD, STEPS = 259, 10


def grpo_run(mode, dtype, rounding="nearest", lr=1e-3, steps=STEPS):
    """`steps` GRPO steps on fixed synthetic groups (2 prompts x G 4, micro-batch 2, fp32 accumulation per
    group), AdamW on delta_S, re-merge each step. Returns delta_S per step, probe logits per step, base logits."""
    torch.manual_seed(0)
    m = build_tiny_model(seed=0).to(dtype)
    ad = SVDAdapter(m, mode=mode, merge_rounding=rounding)
    opt = torch.optim.AdamW(ad.parameters(), lr=lr, betas=(0.9, 0.99), weight_decay=0.0)
    probe = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = m(probe).logits.float()
    deltas, logits, stats = [], [], []
    for step in range(steps):
        gen = torch.Generator().manual_seed(100 + step)
        groups = []
        for p in range(2):
            grp = Group(problem_index=p, prompt_ids=torch.randint(0, 256, (12,), generator=gen).tolist())
            for _ in range(4):
                n = int(torch.randint(4, 16, (1,), generator=gen))
                grp.completions.append(torch.randint(0, 256, (n,), generator=gen).tolist())
            groups.append(grp)
        adv, _ = grpo.group_advantages(torch.randn(2, 4, generator=gen))
        ad.zero_grad()
        for gi, grp in enumerate(groups):
            for ids, attn, cm, rows in micro_batches(grp, PAD, "cpu", 2):
                logp = grpo.completion_logprobs(m, ids, attn, cm)
                loss, _ = grpo.pg_token_loss(logp, logp.detach(), adv[gi, rows], cm)
                (loss / 100).backward()
            ad.accumulate_grad()
        g = ad.collect_grad()
        grpo.apply_update(ad, opt, g, None, ArmConfig(), None, None, 1.0)
        ad.zero_grad()
        stats.append(ad.merge())
        deltas.append(ad.delta.detach().clone())
        with torch.no_grad():
            logits.append(m(probe).logits.float())
    return deltas, logits, base, stats


@pytest.fixture(scope="module")
def runs():
    torch.set_num_threads(1)
    return {"fp32": grpo_run("factored", torch.float32), "factored": grpo_run("factored", torch.bfloat16),
            "merged": grpo_run("merged", torch.bfloat16)}


def _cos(a, b):
    return float(a @ b / (a.norm() * b.norm()))


def test_bf16_merged_delta_trajectory_agrees_with_factored(runs):
    (dm, _, _, stats), (df, _, _, _) = runs["merged"], runs["factored"]
    for s in range(STEPS):
        assert _cos(dm[s], df[s]) >= 0.99, f"step {s + 1}: cos {_cos(dm[s], df[s]):.4f}"
        ratio = float(dm[s].norm() / df[s].norm())
        assert abs(ratio - 1) <= 0.02, f"step {s + 1}: norm ratio {ratio:.4f}"
    # the rounding really was measured, and at lr 1e-3 the first merge loses a visible part of the update
    assert 0 < stats[0]["merge_lost_frac"] < 1 and stats[0]["merge_sub_half_ulp_frac"] > 0.1
    assert stats[-1]["merge_lost_frac"] < stats[0]["merge_lost_frac"]   # larger knobs round relatively less


def test_bf16_merged_is_as_faithful_to_fp32_as_factored(runs):
    d32, l32, b32, _ = runs["fp32"]
    for s in range(STEPS):
        moved = (l32[s] - b32).norm()
        err = {k: (float((runs[k][0][s] - d32[s]).norm() / d32[s].norm()),
                   float((runs[k][1][s] - l32[s]).norm() / moved)) for k in ("merged", "factored")}
        assert err["merged"][0] <= 1.15 * err["factored"][0], f"step {s + 1} delta error {err}"
        assert err["merged"][1] <= 1.15 * err["factored"][1], f"step {s + 1} logit error {err}"
    # and the logits do move with training: after 10 steps the bf16 error is well under the change itself
    assert err["merged"][1] < 0.35


def test_broken_merge_would_fail_the_tracking_check(runs):
    """The check above can fail: a merge that drops the update (W_eff stuck at W0) tracks fp32 far worse."""
    d32, l32, b32, _ = runs["fp32"]
    stuck = runs["merged"][2]   # logits of the base model = a merge that never applied delta_S
    assert float((stuck - l32[-1]).norm() / (l32[-1] - b32).norm()) > 0.9


def test_nearest_merge_drops_sub_half_ulp_updates_and_stochastic_keeps_them_in_expectation():
    m = build_tiny_model(seed=0).to(torch.bfloat16)
    ad = SVDAdapter(m, mode="merged", merge_rounding="nearest")
    with torch.no_grad():
        ad.delta.fill_(1e-6)   # far below half an ulp of every W0 entry
    near = ad.merge()   # only W0 entries next to 0 (tiny ulp) can change
    assert near["merge_changed_frac"] < 0.01 and near["merge_lost_frac"] > 0.9
    ad.merge_rounding = "stochastic"
    st = ad.merge()
    assert st["merge_changed_frac"] > 2 * near["merge_changed_frac"]
    W1 = [g.W.clone() for g in ad.groups]
    ad.merge()   # a pure function of the knob: bitwise the same weights again (resume relies on it)
    assert all(torch.equal(a, g.W) for a, g in zip(W1, ad.groups))


def test_stochastic_round_is_unbiased_and_picks_a_neighbour():
    x = torch.tensor([0.0200013, -0.0200013, 1.00001, -3.3333, 0.0, 7e-3]).repeat(20000, 1)
    gen = torch.Generator().manual_seed(0)
    r = _stochastic_round_bf16(x, gen).float()
    lo = x.to(torch.bfloat16).float()
    for j in range(x.shape[1]):
        vals = set(r[:, j].tolist())
        assert len(vals) <= 2 and lo[0, j].item() in vals | {lo[0, j].item()}
        ulp = (torch.nextafter(x[0, j].abs().to(torch.bfloat16), torch.tensor(float("inf"), dtype=torch.bfloat16))
               .float() - x[0, j].abs().to(torch.bfloat16).float())
        assert abs(r[:, j].mean().item() - x[0, j].item()) < 0.02 * ulp.item() + 1e-12
