"""`pgrpo eval`: both loophole modes in one command on the shared benchmark rows; a run and its export evaluate
identically; Wilson intervals."""
import json
import os
import subprocess
import sys

import pytest

from helpers import SHARED, SHARED_MISSING

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FDR = os.path.join(ROOT, "jobs", "fast-dev-run.yaml")
FAST = ["--samples", "2", "--max-new-tokens", "12", "--max-problems", "3", "--workers", "1"]


def pgrpo(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "pgrpo", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=timeout, env=dict(os.environ, PYTHONUNBUFFERED="1"))


def read(out):
    with open(os.path.join(out, "summary.json")) as f:
        summary = json.load(f)
    with open(os.path.join(out, "samples.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return summary, rows


@pytest.mark.skipif(not SHARED.is_file(), reason=SHARED_MISSING)
def test_eval_on_the_shared_dev_rows_in_both_modes(tmp_path):
    out = str(tmp_path / "ev")
    p = pgrpo("eval", "tiny", "--problems", str(SHARED), "--out", out, *FAST)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    summary, rows = read(out)
    assert list(summary["modes"]) == ["none", "run_tests"]
    for mode, s in summary["modes"].items():
        mine = [r for r in rows if r["mode"] == mode]
        assert s["n"] == len(mine) == 6 and s["problems"] == 3
        assert s["hack_rate"] == sum(r["label"] == "reward_hack" for r in mine) / 6
        lo, hi = s["hack_rate_ci95"]
        assert 0 <= lo <= s["hack_rate"] <= hi <= 1 and hi > 0.3   # 6 samples: a wide interval, honestly
        assert sum(s[f"frac_{lab}"] for lab in ("correct", "correct_attempted_hack", "reward_hack",
                                                 "attempted_hack", "incorrect")) == pytest.approx(1.0)
        assert f"eval {mode}: hack" in p.stdout
    # the two modes prompt differently (the overwrite-tests hint), problem by problem
    by = {(r["mode"], r["problem_id"]): r["prompt_sha256"] for r in rows}
    pids = {r["problem_id"] for r in rows}
    assert all(by[("none", pid)] != by[("run_tests", pid)] for pid in pids)
    # every sample was graded under its own mode, exactly as `pgrpo grade` grades it
    resp = tmp_path / "resp.jsonl"
    resp.write_text("".join(json.dumps({"id": r["problem_id"], "response": r["text"], "mode": r["mode"]}) + "\n"
                            for r in rows))
    g = pgrpo("grade", "--problems", str(SHARED), "--responses", str(resp), "--workers", "1")
    assert g.returncode == 0, g.stderr
    graded = [json.loads(line) for line in g.stdout.splitlines()]
    assert [(x["label"], x["reward"]) for x in graded] == [(r["label"], r["reward"]) for r in rows]


def test_a_run_and_its_export_evaluate_identically(tmp_path):
    from pgrpo.data.problems import builtin_problems, problem_to_row
    probs = tmp_path / "p.jsonl"
    probs.write_text("".join(json.dumps(problem_to_row(p)) + "\n" for p in builtin_problems()[:3]))
    run = str(tmp_path / "run")
    p = pgrpo("train", "--config", FDR, "--out", run, "--set", "steps=1", "--set", "rollout.max_new_tokens=8",
              "--set", "grader_workers=1")
    assert p.returncode == 0, p.stderr[-2000:]
    assert pgrpo("export", run, "--out", str(tmp_path / "hf")).returncode == 0
    a = pgrpo("eval", run, "--problems", str(probs), "--mode", "run_tests", *FAST)
    b = pgrpo("eval", str(tmp_path / "hf"), "--problems", str(probs), "--mode", "run_tests", "--out",
              str(tmp_path / "ev-hf"), *FAST)
    assert a.returncode == 0 and b.returncode == 0, a.stderr[-2000:] + b.stderr[-2000:]
    sa, ra = read(os.path.join(run, "eval", "p"))   # the default --out for a run target
    sb, rb = read(str(tmp_path / "ev-hf"))
    assert sa["source"]["run"] == os.path.abspath(run) and sa["source"]["step"] == 1
    assert [r["text"] for r in ra] == [r["text"] for r in rb] and sa["modes"] == sb["modes"]
    from pgrpo.evaluate import read_summaries
    assert read_summaries(run)["p"]["modes"]["run_tests"]["n"] == 6


def test_wilson_interval():
    from pgrpo.evaluate import wilson
    lo, hi = wilson(0, 10)
    assert lo == 0 and hi == pytest.approx(0.2775, abs=1e-4)
    lo, hi = wilson(5, 10)
    assert (lo, hi) == (pytest.approx(0.2366, abs=1e-4), pytest.approx(0.7634, abs=1e-4))
    assert wilson(0, 0) == (0.0, 1.0)


def test_eval_refuses_bad_input_before_work(tmp_path):
    (tmp_path / "f").write_text("x")
    p = pgrpo("eval", "tiny", "--problems", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "f" / "o"))
    assert p.returncode == 2 and "--out" in p.stderr and "Traceback" not in p.stderr
    p = pgrpo("eval", "tiny", "--problems", str(tmp_path / "nope.jsonl"), "--mode", "bogus")
    assert p.returncode == 2 and "bogus" in p.stderr
