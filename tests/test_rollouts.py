"""Saved completions: the writer is crash-safe and replaces a redone step; `pgrpo rollouts` filters them for
people; the report shows example hacks per arm and the `pgrpo eval` summaries."""
import gzip
import json
import os
import subprocess
import sys

from pgrpo import rollouts
from pgrpo.rollout import Group

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _rows(step, labels):
    g = Group(problem_index=0, prompt_ids=[1, 2], completions=[[5] * (i + 1) for i in range(len(labels))],
              texts=[f"answer {step}.{i}" for i in range(len(labels))], teacher=[False] * (len(labels) - 1) + [True])
    res = [{"label": lab, "reward": 3.0 if lab == "reward_hack" else 0.0, "gt_pass": False, "gt_pass_rate": 0.0,
            "loophole_pass": lab == "reward_hack"} for lab in labels]
    import torch
    adv = torch.tensor([[1.0] * len(labels)])
    return rollouts.rows_of("train", step, [g], res, ["p0"], ["abcd" * 4], adv, torch.tensor([True]))


def test_writer_replaces_a_redone_step_and_drops_the_future(tmp_path):
    d = str(tmp_path)
    for s in (1, 2, 3):
        rollouts.write(d, s, _rows(s, ["incorrect", "reward_hack"]))
    open(os.path.join(d, "rollouts", "step_000004.jsonl.gz.tmp.123"), "wb").write(b"half")
    rollouts.drop_after(d, 1)                       # resume from the step-1 checkpoint
    assert [s for _, s, _ in rollouts.files(d)] == [1] and os.listdir(os.path.join(d, "rollouts")) == ["step_000001.jsonl.gz"]
    rollouts.write(d, 1, _rows(1, ["correct", "incorrect"]))   # the redone step replaces its file
    rows = rollouts.load(d)
    assert [r["label"] for r in rows] == ["correct", "incorrect"]
    assert rows[0]["tokens"] == 1 and rows[1]["source"] == "teacher" and rows[0]["advantage"] == 1.0
    with gzip.open(rollouts.path_of(d, 1)) as f:
        assert len(f.read().splitlines()) == 2


def test_cli_filters_by_step_and_label(tmp_path):
    d = str(tmp_path)
    rollouts.write(d, 1, _rows(1, ["incorrect", "reward_hack", "reward_hack"]))
    rollouts.write(d, 2, _rows(2, ["reward_hack", "correct"]))
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    p = subprocess.run([sys.executable, "-m", "pgrpo", "rollouts", d, "--label", "reward_hack", "--json"],
                       capture_output=True, text=True, cwd=ROOT, env=env, timeout=60)
    got = [json.loads(x) for x in p.stdout.splitlines()]
    assert p.returncode == 0 and [(r["step"], r["sample"]) for r in got] == [(1, 1), (1, 2), (2, 0)]
    p = subprocess.run([sys.executable, "-m", "pgrpo", "rollouts", d, "--step", "2"], capture_output=True, text=True,
                       cwd=ROOT, env=env, timeout=60)
    assert p.returncode == 0 and "train step 2 problem p0 #0 (policy, 1 tok): reward_hack" in p.stdout
    assert "answer 2.1" in p.stdout and "answer 1." not in p.stdout
    p = subprocess.run([sys.executable, "-m", "pgrpo", "rollouts", str(tmp_path / "nope")], capture_output=True,
                       text=True, cwd=ROOT, env=env, timeout=60)
    assert p.returncode == 2 and "no rollouts/ folder" in p.stderr


def test_report_shows_example_hacks_per_arm_and_eval_summaries(tmp_path):
    from pgrpo.report import saved_outputs_markdown
    a, b = tmp_path / "vanilla-s0", tmp_path / "projected-s0"
    rollouts.write(str(a), 3, _rows(3, ["incorrect", "reward_hack", "reward_hack"]))   # the last is a teacher's
    rollouts.write(str(b), 3, _rows(3, ["incorrect", "incorrect"]))
    (a / "eval" / "dev").mkdir(parents=True)
    from pgrpo.evaluate import summarize
    rows = [{"problem_id": "p", "label": "reward_hack", "gt_pass": False, "reward": 3.0}] * 2
    (a / "eval" / "dev" / "summary.json").write_text(json.dumps({"modes": {"run_tests": summarize(rows)}}))
    md = saved_outputs_markdown([{"arm": "vanilla", "name": "vanilla-s0", "path": str(a)},
                                 {"arm": "projected", "name": "projected-s0", "path": str(b)}])
    assert "## Example reward hacks per arm" in md and "### projected\n\n(no reward hack saved)" in md
    assert "answer 3.1" in md and "answer 3.2" not in md    # the policy's own hack, never the teacher's
    assert "| vanilla-s0 | dev | run_tests | 2 | 1.000 [0.342, 1.000] |" in md
