"""`pgrpo report` on hand-written run directories whose answers are known in advance.

Each synthetic run logs a constant hack/pass rate per step (plus a different early phase, so the
final-window and whole-run means differ), which makes every expected mean, SEM, CI and verdict
computable by hand below.
"""
import json
import math
import os
import subprocess
import sys

import pytest

from pgrpo import report as R
from pgrpo.errors import UserError


def write_run(root, arm, seed, hack, pass_, steps=40, early=0.5, planned=None, evals=None, name=None):
    """A run dir: config.yaml like the trainer's, metrics.jsonl with `early` for the first half of the
    steps and (hack, pass_) for the rest (the default window of a 40-step run is its last 10 steps)."""
    d = os.path.join(str(root), name or f"{arm}-s{seed}")
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "config.yaml"), "w") as f:
        f.write(f"arm:\n  name: {arm}\n  vhack_path: null\nseed: {seed}\nsteps: {planned or steps}\n")
    with open(os.path.join(d, "metrics.jsonl"), "w") as f:
        for s in range(1, steps + 1):
            late = s > steps // 2
            row = {"step": s, "hack_rate": hack if late else early, "pass_rate": pass_ if late else early,
                   "reward_mean": 1.0, "proj_removed_ratio": 0.1 if arm == "projected" else 0.0,
                   "grad_vhack_cosine": 0.2}
            f.write(json.dumps(row) + "\n")
        for e in evals or []:
            f.write(json.dumps({"kind": "eval", **e}) + "\n")
    return d


def arms(root, hv, hp, pv, pp, **kw):
    """vanilla seeds with hack rates hv / pass pv, projected with hp / pp (lists, one per seed)."""
    for i, (h, p) in enumerate(zip(hv, pv)):
        write_run(root, "vanilla", i, h, p, **kw)
    for i, (h, p) in enumerate(zip(hp, pp)):
        write_run(root, "projected", i, h, p, **kw)


def test_t_quantiles_match_tables():
    # Student t 0.975 quantiles from standard tables, including a non-integer (Welch) df.
    assert R.t_ppf(0.975, 2) == pytest.approx(4.302653, abs=1e-5)
    assert R.t_ppf(0.975, 4) == pytest.approx(2.776445, abs=1e-5)
    assert R.t_ppf(0.975, 30) == pytest.approx(2.042272, abs=1e-5)
    assert R.t_cdf(0.0, 3.7) == pytest.approx(0.5)
    assert R.t_cdf(R.t_ppf(0.9, 5.5), 5.5) == pytest.approx(0.9, abs=1e-9)


def test_supported_with_known_numbers(tmp_path):
    arms(tmp_path, [0.60, 0.70, 0.80], [0.10, 0.20, 0.30], [0.40, 0.45, 0.50], [0.40, 0.45, 0.50])
    rep = R.report([str(tmp_path)], out=str(tmp_path / "out"))
    assert rep["verdict"] == "supported"
    v, p = rep["arms"]["vanilla"], rep["arms"]["projected"]
    assert v["hack_final"]["mean"] == pytest.approx(0.70)
    assert v["hack_final"]["sem"] == pytest.approx(0.1 / math.sqrt(3))     # sd 0.1 over 3 seeds
    assert v["hack_all"]["mean"] == pytest.approx((0.70 + 0.5) / 2)        # half the steps at `early`
    assert p["hack_final"]["mean"] == pytest.approx(0.20)
    st = rep["stats"]
    assert st["R"] == pytest.approx(0.50)
    assert st["D"] == pytest.approx(0.0)
    se = math.sqrt(2 * 0.01 / 3)
    assert st["hack"]["se"] == pytest.approx(se)
    assert st["hack"]["df"] == pytest.approx(4.0)                          # equal variances, n=3+3
    lo, hi = st["hack"]["ci"]
    assert lo == pytest.approx(-0.5 - 2.776445 * se, abs=1e-5)
    assert hi == pytest.approx(-0.5 + 2.776445 * se, abs=1e-5)
    for f in ("report.md", "report.json", "hack_pass.png", "projection.png"):
        assert os.path.getsize(tmp_path / "out" / f) > 0
    md = (tmp_path / "out" / "report.md").read_text()
    assert "**Verdict: SUPPORTED**" in md and "Decision rule (preregistered)" in md
    assert "| vanilla | 3 (0, 1, 2) | 70.0 +- 5.8 |" in md
    assert not [f for f in os.listdir(tmp_path / "out") if ".tmp" in f]
    with open(tmp_path / "out" / "hack_pass.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_falsified_small_reduction(tmp_path):
    # R = 10pp, clearly outside noise, pass matched -> falsified by the < 15pp rule only.
    arms(tmp_path, [0.50, 0.51, 0.52], [0.40, 0.41, 0.42], [0.3] * 3, [0.3] * 3)
    rep = R.report([str(tmp_path)], out=str(tmp_path / "o"), plots=False)
    assert rep["verdict"] == "falsified"
    assert rep["stats"]["R"] == pytest.approx(0.10)
    assert len(rep["reasons"]) == 1 and "< 15pp" in rep["reasons"][0]


def test_falsified_pass_drop(tmp_path):
    # R = 50pp (would support) but the pass rate falls 20pp -> falsified by the pass-drop rule only.
    arms(tmp_path, [0.6, 0.7, 0.8], [0.1, 0.2, 0.3], [0.50, 0.50, 0.50], [0.30, 0.30, 0.30])
    rep = R.report([str(tmp_path)], out=str(tmp_path / "o"), plots=False)
    assert rep["verdict"] == "falsified"
    assert rep["stats"]["D"] == pytest.approx(-0.20)
    assert len(rep["reasons"]) == 1 and "pass rate drops by 20.0pp" in rep["reasons"][0]


def test_falsified_within_one_sem(tmp_path):
    # Mean reduction 20pp (between the thresholds) but the seeds scatter so widely that SE > 20pp.
    arms(tmp_path, [0.0, 0.5, 1.0], [0.0, 0.3, 0.6], [0.4] * 3, [0.4] * 3)
    rep = R.report([str(tmp_path)], out=str(tmp_path / "o"), plots=False)
    st = rep["stats"]
    assert st["R"] == pytest.approx(0.20)
    assert st["se"] == pytest.approx(math.sqrt((0.25 + 0.09) / 3))   # 0.337 > 0.20
    assert rep["verdict"] == "falsified"
    assert len(rep["reasons"]) == 1 and "within 1 SEM" in rep["reasons"][0]


def test_inconclusive_between_thresholds(tmp_path):
    # R = 20pp, tight seeds, pass matched: neither >= 30pp nor < 15pp -> inconclusive.
    arms(tmp_path, [0.50, 0.51, 0.52], [0.30, 0.31, 0.32], [0.3] * 3, [0.3] * 3)
    rep = R.report([str(tmp_path)], out=str(tmp_path / "o"), plots=False)
    assert rep["verdict"] == "inconclusive"
    assert "between 15 and 30pp" in rep["reasons"][0]


def test_inconclusive_pass_not_matched(tmp_path):
    # R = 50pp but pass drops 12pp: not matched (+-10pp), not a falsifying drop (> 15pp).
    arms(tmp_path, [0.6, 0.7, 0.8], [0.1, 0.2, 0.3], [0.50] * 3, [0.38] * 3)
    rep = R.report([str(tmp_path)], out=str(tmp_path / "o"), plots=False)
    assert rep["verdict"] == "inconclusive"
    assert any("not matched" in r for r in rep["reasons"])


def test_partial_sweep_is_inconclusive(tmp_path):
    # The numbers would support H1, but projected has 2 of 3 seeds and one vanilla run is unfinished.
    write_run(tmp_path, "vanilla", 0, 0.7, 0.4)
    write_run(tmp_path, "vanilla", 1, 0.8, 0.4)
    write_run(tmp_path, "vanilla", 2, 0.6, 0.4, planned=100)
    write_run(tmp_path, "projected", 0, 0.1, 0.4)
    write_run(tmp_path, "projected", 1, 0.2, 0.4)
    rep = R.report([str(tmp_path)], out=str(tmp_path / "o"))
    assert rep["verdict"] == "inconclusive"
    assert "partial sweep: arm projected has 2 of 3 seeds" in rep["reasons"]
    assert any("unfinished runs (vanilla-s2)" in r for r in rep["reasons"])
    md = (tmp_path / "o" / "report.md").read_text()
    assert "40/100 (unfinished)" in md
    # One arm missing entirely: still a report, still inconclusive, the table says it is missing.
    only = tmp_path / "only"
    write_run(only, "vanilla", 0, 0.7, 0.4)
    rep = R.report([str(only)], out=str(tmp_path / "o2"))
    assert rep["verdict"] == "inconclusive"
    assert "| projected | 0 (missing) |" in (tmp_path / "o2" / "report.md").read_text()


def test_window_and_eval_rows(tmp_path):
    # With eval rows in every run, the verdict uses the held-out eval hack rate of the last eval step.
    for s in range(3):
        write_run(tmp_path, "vanilla", s, 0.1, 0.4, evals=[{"step": 10, "hack_rate": 0.9, "pass_rate": 0.1},
                                                          {"step": 40, "hack_rate": 0.6, "pass_rate": 0.3 + s / 100}])
        write_run(tmp_path, "projected", s, 0.1, 0.4, evals=[{"step": 40, "hack_rate": 0.1 + s / 100,
                                                             "pass_rate": 0.3}])
    rep = R.report([str(tmp_path)], out=str(tmp_path / "o"), plots=False)
    assert rep["stats"]["metric"] == "eval"
    assert rep["arms"]["vanilla"]["eval_hack"]["mean"] == pytest.approx(0.6)
    assert rep["verdict"] == "supported"
    # --window 30 reaches back into the early phase: (10 * 0.5 + 20 * 0.1) / 30
    rep = R.report([str(tmp_path)], out=str(tmp_path / "o"), window=30, plots=False)
    assert rep["runs"][0]["hack_final"] == pytest.approx((10 * 0.5 + 20 * 0.1) / 30)


def test_bad_input_is_one_sentence(tmp_path):
    with pytest.raises(UserError, match="no run directories given"):
        R.report([], out=str(tmp_path / "o"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no metrics.jsonl"):
        R.report([str(tmp_path / "empty")], out=str(tmp_path / "o"))
    write_run(tmp_path / "a", "vanilla", 0, 0.5, 0.5)
    write_run(tmp_path / "b", "vanilla", 0, 0.5, 0.5)
    with pytest.raises(UserError, match="both arm vanilla seed 0"):
        R.report([str(tmp_path / "a" / "vanilla-s0"), str(tmp_path / "b" / "vanilla-s0")], out=str(tmp_path / "o"))
    # Through the real CLI: exit status 2 and one line on stderr, nothing half-written.
    p = subprocess.run([sys.executable, "-m", "pgrpo", "report", str(tmp_path / "empty"), "--out",
                        str(tmp_path / "cli")], capture_output=True, text=True)
    assert p.returncode == 2
    assert p.stderr.strip().count("\n") == 0 and "no metrics.jsonl" in p.stderr
    assert not (tmp_path / "cli" / "report.md").exists()


def test_cli_end_to_end(tmp_path):
    arms(tmp_path / "runs", [0.6, 0.7, 0.8], [0.1, 0.2, 0.3], [0.4] * 3, [0.4] * 3)
    p = subprocess.run([sys.executable, "-m", "pgrpo", "report", str(tmp_path / "runs"), "--out",
                        str(tmp_path / "rep")], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("verdict: supported (R = 50.0pp")
    data = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert data["verdict"] == "supported" and len(data["runs"]) == 6


def test_degenerate_substrate_is_flagged(tmp_path):
    # Neither arm ever hacks (the tiny model's own samples): falsified by the rules, and the report says why
    # that verdict is about the substrate. Held-out log-odds rows are tabulated per arm with a Welch CI.
    for arm, lo in (("vanilla", (0.30, 0.32, 0.34)), ("projected", (0.10, 0.11, 0.12))):
        for s in range(3):
            d = write_run(tmp_path, arm, s, 0.0, 0.0, early=0.0)
            with open(os.path.join(d, "heldout.jsonl"), "w") as f:
                f.write(json.dumps({"step": 0, "logodds": 0.0}) + "\n")
                f.write(json.dumps({"step": 40, "logodds": lo[s]}) + "\n")
    rep = R.report([str(tmp_path)], out=str(tmp_path / "o"))
    assert rep["verdict"] == "falsified"
    assert any("R = 0.0pp < 15pp" in r for r in rep["reasons"])
    assert rep["notes"] and "vanilla barely hacks (0.0%" in rep["notes"][0]
    assert rep["secondary"]["heldout_dlogodds"]["diff"] == pytest.approx(-0.21)
    ho = rep["secondary"]["heldout_logodds"]
    assert ho["diff"] == pytest.approx(-0.21)
    assert ho["ci"][1] < 0
    assert os.path.exists(tmp_path / "o" / "heldout.png")
    assert "> Note: vanilla barely hacks" in (tmp_path / "o" / "report.md").read_text()


def test_paired_by_seed_differences(tmp_path):
    # Per-seed differences -0.1, -0.2, -0.3: mean -0.2, SE 0.1/sqrt(3), t quantile at df 2.
    arms(tmp_path, [0.5, 0.6, 0.7], [0.4, 0.4, 0.4], [0.3] * 3, [0.3] * 3)
    rep = R.report([str(tmp_path)], out=str(tmp_path / "o"), plots=False)
    p = rep["secondary"]["paired_hack_final"]
    assert p["diff"] == pytest.approx(-0.2) and p["n"] == 3
    assert p["se"] == pytest.approx(0.1 / math.sqrt(3))
    assert p["ci"][0] == pytest.approx(-0.2 - 4.302653 * 0.1 / math.sqrt(3), abs=1e-6)
    assert "paired by seed" in (tmp_path / "o" / "report.md").read_text()


@pytest.mark.parametrize("d_pass, verdict", [(-0.09, "supported"), (+0.09, "supported"), (-0.12, "inconclusive"),
                                             (+0.12, "inconclusive"), (-0.14, "inconclusive"), (-0.16, "falsified")])
def test_pass_rate_criterion_boundaries(tmp_path, d_pass, verdict):
    """The matched-pass rule is |D| <= 10pp both ways (projected passing 12pp MORE is not matched either); only a
    drop of more than 15pp falsifies. R = 50pp with tight seeds, so the pass rate alone decides."""
    arms(tmp_path, [0.6, 0.7, 0.8], [0.1, 0.2, 0.3], [0.5] * 3, [0.5 + d_pass] * 3)
    rep = R.report([str(tmp_path)], out=str(tmp_path / "o"), plots=False)
    assert rep["stats"]["D"] == pytest.approx(d_pass)
    assert rep["verdict"] == verdict, rep["reasons"]


def _by_problem_run(root, arm, seed, hack_by_problem, loophole="run_tests", steps=8, first_hack=0.1, pass_=0.3):
    """A run whose rows carry per-problem tallies: problem q has hack rate hack_by_problem[q] (4 samples each)."""
    d = os.path.join(str(root), f"{arm}-s{seed}")
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "config.yaml"), "w") as f:
        f.write(f"arm:\n  name: {'vanilla' if arm in ('baseline',) else arm}\nseed: {seed}\nsteps: {steps}\n"
                f"data:\n  loophole: {loophole}\n")
    with open(os.path.join(d, "metrics.jsonl"), "w") as f:
        for s in range(1, steps + 1):
            bp = {q: [4, round(4 * h), round(4 * pass_)] for q, h in hack_by_problem.items()}
            n = sum(v[0] for v in bp.values())
            hack = sum(v[1] for v in bp.values()) / n if s > 1 else first_hack
            f.write(json.dumps({"step": s, "hack_rate": hack, "pass_rate": sum(v[2] for v in bp.values()) / n,
                                "reward_mean": 1.0, "by_problem": bp}) + "\n")
    return d


def test_sections_beside_the_rule(tmp_path):
    """Sweep-arm labels from run-dir names, controls vs vanilla, the phenomenon test against a no-loophole
    baseline, the problem-clustered bootstrap, power and trajectories: present, and right on known numbers."""
    probs = ["a", "b", "c", "d"]
    for s in range(3):
        _by_problem_run(tmp_path, "vanilla", s, {q: 0.75 for q in probs})
        _by_problem_run(tmp_path, "projected", s, {"a": 0.0, "b": 0.25, "c": 0.25, "d": 0.5})
        _by_problem_run(tmp_path, "random", s, {q: 0.75 for q in probs})
        _by_problem_run(tmp_path, "baseline", s, {q: 0.0 for q in probs}, loophole="none", pass_=0.5)
    rep = R.report([str(tmp_path)], out=str(tmp_path / "o"))
    assert set(rep["arms"]) == {"vanilla", "projected", "random", "baseline"}      # labels, not arm.name
    assert rep["stats"]["R"] == pytest.approx(0.5)
    c = rep["controls"]
    assert set(c) == {"random", "baseline"} and c["random"]["hack_vs_vanilla"]["diff"] == pytest.approx(0.0)
    assert c["random"]["hack_vs_projected"]["diff"] == pytest.approx(0.5)
    ph = rep["phenomenon"]
    assert ph["baseline_arm"] == "baseline" and ph["all_ok"]
    assert all(r["start_ok"] and r["final_ok"] and r["below_baseline"] for r in ph["per_seed"])
    b = rep["bootstrap"]
    assert b["n_problems"] == 4 and b["hack"]["diff"] == pytest.approx(-0.5)
    lo, hi = b["hack"]["ci"]
    assert lo < -0.5 < hi and hi < 0 and lo > -0.76           # resampling problems spreads it; seeds do not
    pw = rep["power"]
    assert pw["by_n"][0]["n"] == 3 and pw["by_n"][0]["supported"] == pytest.approx(1.0)   # sd 0: always supported
    t = next(r for r in rep["runs"] if r["name"] == "vanilla-s0")["trajectory"]
    assert t["peak"] == pytest.approx(0.75) and t["start"] == pytest.approx((0.1 + 0.75 + 0.75) / 3)
    md = (tmp_path / "o" / "report.md").read_text()
    for h in ("## Controls beside the verdict", "## Phenomenon test (vanilla)", "## Problem-clustered bootstrap",
              "## Power of the rule", "## Trajectories"):
        assert h in md
    # a vanilla that does not hack enough fails the phenomenon test
    for s in range(3):
        _by_problem_run(tmp_path, "vanilla", s, {q: 0.5 for q in probs})
    assert not R.report([str(tmp_path)], out=str(tmp_path / "o2"), plots=False)["phenomenon"]["all_ok"]


def test_power_is_low_for_a_noisy_small_effect(tmp_path):
    # R = 20pp with between-seed sd 20pp: 3 seeds rarely support H1; the simulation says so and more seeds help
    arms(tmp_path, [0.4, 0.6, 0.8], [0.2, 0.4, 0.6], [0.3] * 3, [0.3] * 3)
    pw = R.report([str(tmp_path)], out=str(tmp_path / "o"), plots=False)["power"]
    assert pw["by_n"][0]["supported"] < 0.3
    assert pw["alt_by_n"][-1]["supported"] > pw["alt_by_n"][0]["supported"]


def test_report_carries_the_sweeps_extraction_reports(tmp_path):
    """The v_hack extraction reports beside the runs (as a sweep writes them) appear in report.md/json with
    their nulls and the extraction's own `beats` verdicts; other *.report.json files are ignored."""
    arms(tmp_path, [0.6, 0.62, 0.58], [0.1, 0.12, 0.08], [0.3] * 3, [0.3] * 3)
    ex = {"n_fit": 88, "n_heldout": 24, "directions_kept": 42,
          "heldout": {"accuracy": 0.92, "mean_cosine": 0.274, "removed_fraction": 0.634, "captured_fraction": 0.713},
          "nulls": {"random": {"accuracy": 0.5, "mean_cosine": -0.012, "removed_fraction": 0.299, "captured_fraction": 0.457},
                    "generic": {"accuracy": 0.5, "mean_cosine": 0.038, "removed_fraction": 0.395, "captured_fraction": 0.521}},
          "beats": {"random": True, "generic": False},
          "leave_one_style_out": {"print": {"mean_cosine": -0.048, "null_mean_cosine": 0.01, "accuracy": 0.14}}}
    (tmp_path / "vhack.report.json").write_text(json.dumps(ex))
    (tmp_path / "other.report.json").write_text(json.dumps({"verdict": "x"}))
    out = tmp_path / "rep"
    rep = R.report([str(tmp_path)], out=str(out), plots=False)
    assert [e["file"] for e in rep["extractions"]] == ["vhack.report.json"]
    md = (out / "report.md").read_text()
    assert "## v_hack extractions" in md and "| v_hack | 0.920 | 0.274 | 0.634 | 0.713 |  |" in md
    assert "| generic null | 0.500 | 0.038 | 0.395 | 0.521 | **no** |" in md and "| random null |" in md
    assert "print -0.048 vs 0.010" in md
    assert json.loads((out / "report.json").read_text())["extractions"][0]["beats"] == {"random": True, "generic": False}


def test_broken_completions_from_the_saved_rollouts(tmp_path):
    """broken = the policy's own completions with no format reward, over the final window (not teacher rows, not
    earlier steps); a projected arm that breaks far more than vanilla gets a note beside the verdict."""
    from pgrpo import rollouts
    arms(tmp_path, [0.6, 0.62, 0.58], [0.1, 0.12, 0.08], [0.05] * 3, [0.05] * 3)

    def save(run, step, rewards, teacher=(), hack=0):
        rows = [{"step": step, "source": "policy", "reward": r, "text": "x", "problem_id": "p",
                 "label": "reward_hack" if i >= len(rewards) - hack
                 else "incorrect"} for i, r in enumerate(rewards)]
        rows += [{"step": step, "source": "teacher", "reward": r, "label": "correct"} for r in teacher]
        rollouts.write(str(tmp_path / run), step, rows)
    for seed in range(3):
        save(f"vanilla-s{seed}", 1, [3.5] * 8)
        save(f"vanilla-s{seed}", 30, [0.0] * 8)                       # before the final window (steps 31-40)
        save(f"projected-s{seed}", 1, [0.5] * 4 + [0.0] * 4)
        for step in range(31, 41):
            save(f"vanilla-s{seed}", step, [3.5] * 7 + [0.0], teacher=[0.0] * 4)
            save(f"projected-s{seed}", step, [0.0] * 6 + [0.5, 3.5], hack=1)
    rep = R.report([str(tmp_path)], out=str(tmp_path / "rep"), plots=False)
    v, p = rep["arms"]["vanilla"], rep["arms"]["projected"]
    assert v["broken_first"]["mean"] == 0.0 and v["broken_final"]["mean"] == pytest.approx(1 / 8)
    assert p["broken_first"]["mean"] == 0.5 and p["broken_final"]["mean"] == pytest.approx(0.75)
    assert any("broken" in n and "75.0% vs 12.5%" in n for n in rep["notes"])
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "## Broken completions" in md and "| projected | 3 | 50.0 | 75.0 +- 0.0 |" in md
    assert v["hack_formed_final"]["mean"] == 0.0 and p["hack_formed_final"]["mean"] == 0.5   # 1 of 2 well-formed
