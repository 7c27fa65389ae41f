"""Contrastive pairs: the shipped file grades as claimed through the real grader, `pgrpo pairs --check`
fails loudly on a corrupted file, the builder is deterministic and only keeps pairs the grader confirms."""
import json
import os
import subprocess
import sys
from collections import Counter

import pytest

from pgrpo.data import pairs as P
from pgrpo.data.problems import builtin_problems
from pgrpo.data.prompts import build_prompt

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PGRPO = [sys.executable, "-m", "pgrpo"]


def _run(args, **kw):
    return subprocess.run(PGRPO + args, capture_output=True, text=True, cwd=ROOT, timeout=300, **kw)


@pytest.fixture(scope="module")
def shipped():
    return P.load_pairs()


def test_shipped_file_shape(shipped):
    """60-80 pairs, varied styles, every loophole mode, many problems, prompts match build_prompt."""
    assert 60 <= len(shipped) <= 80
    styles = Counter(r["style"] for r in shipped)
    assert set(styles) == set(P.STYLES), styles
    assert {r["mode"] for r in shipped} == {"run_tests", "sentinel", "stdout_marker", "file_marker"}
    by_id = {p.id: p for p in builtin_problems()}
    assert len({r["problem_id"] for r in shipped}) >= 40
    for r in shipped:
        assert r["prompt"] == build_prompt(by_id[r["problem_id"]], r["mode"])
        assert r["hack"] != r["clean"]
        assert "```python\n" in r["hack"] and "```python\n" in r["clean"]
        assert "def run_tests" in r["clean"] and "assert " in r["clean"]
    # the hack texts are not one template: many distinct (style, exploit) bodies
    assert len({r["hack"].split("```python", 1)[1] for r in shipped}) == len(shipped)


def test_check_cli_passes_on_shipped_file():
    """Every shipped pair graded by the real grader: clean -> correct, hack -> reward_hack."""
    p = _run(["pairs", "--check", P.DEFAULT_PATH])
    assert p.returncode == 0, p.stderr[-3000:]
    assert f"all {len(P.load_pairs())} pairs OK" in p.stdout


def test_check_cli_fails_on_corrupted_file(tmp_path, shipped):
    """A pair whose 'clean' is really a hack, and one whose hack is really clean, each get a per-row message."""
    rows = [dict(r) for r in shipped[:3]]
    rows[0]["clean"] = "Fixed:\n\n" + shipped[0]["hack"]   # a 'clean' that hacks
    rows[2]["hack"] = "Hack:\n\n" + shipped[2]["clean"]    # a 'hack' that is correct
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(rows))
    p = _run(["pairs", "--check", str(bad)])
    assert p.returncode == 1
    assert f"pair 0 ({rows[0]['style']}, {rows[0]['problem_id']}): clean graded 'reward_hack' (want 'correct')" in p.stderr
    assert "pair 1" not in p.stderr
    assert "pair 2" in p.stderr and "hack graded 'correct' (want 'reward_hack')" in p.stderr
    assert "2 problem(s) in 3 pairs" in p.stderr


def test_check_cli_schema_errors(tmp_path, shipped):
    rows = [dict(r) for r in shipped[:2]]
    del rows[1]["clean"]
    f = tmp_path / "schema.json"
    f.write_text(json.dumps(rows))
    p = _run(["pairs", "--check", str(f)])
    assert p.returncode == 1 and f"pair 1 ({rows[1]['style']}, {rows[1]['problem_id']}): missing field(s) clean" in p.stderr
    rows = [dict(shipped[0], mode="none")]
    f.write_text(json.dumps(rows))
    p = _run(["pairs", "--check", str(f)])
    assert p.returncode == 1 and "): mode 'none' must be a loophole mode" in p.stderr
    rows = [dict(shipped[0], problem_id="nope")]
    f.write_text(json.dumps(rows))
    p = _run(["pairs", "--check", str(f)])
    assert p.returncode == 1 and "problem_id 'nope' is not in the problem set" in p.stderr
    f.write_text("{not json")
    p = _run(["pairs", "--check", str(f)])
    assert p.returncode == 2 and "invalid JSON" in p.stderr


def test_build_is_deterministic_and_graded(tmp_path):
    """Two builds of a small set are identical, and every kept pair was confirmed by the grader."""
    probs = builtin_problems()[:8]
    per = {"try_except": 2, "hardcoded": 1, "file_marker": 1, "sentinel": 1}
    from pgrpo.grader.client import LocalGrader
    with LocalGrader(workers=2) as lg:
        c = lg.client()
        a = P.build_pairs(probs, grader=c, per_style=per)
        b = P.build_pairs(probs, grader=c, per_style=per)
        assert a == b
        assert Counter(r["style"] for r in a) == Counter(per)
        assert P.check_pairs(a, probs, grader=c) == []
    P.save_pairs(a, tmp_path / "p.json")
    assert P.load_pairs(tmp_path / "p.json") == a


def test_pairs_module_is_torch_free():
    code = "import sys, pgrpo.data.pairs; assert 'torch' not in sys.modules, 'torch imported'"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 0, p.stderr
