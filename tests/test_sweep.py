"""`pgrpo sweep`: planning, skip-finished, status, and a real two-run sweep with one run killed and resumed.

The end-to-end test drives the real CLI (`python -m pgrpo sweep`) which runs the real trainer
(`python -m pgrpo train`, tiny model, real grader child) as subprocesses; the kill is a SIGKILL of the
training process group mid-run, exactly what an OOM killer or a lost node does.
"""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from pgrpo import sweep as S
from pgrpo.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_preset(tmp_path, steps=2, **over):
    """The fast-dev-run preset made smaller: the real trainer, a few steps, a checkpoint every step."""
    with open(os.path.join(ROOT, "jobs", "fast-dev-run.yaml")) as f:
        d = yaml.safe_load(f)
    d.update(steps=steps, checkpoint_every=1)
    d["rollout"].update(group_size=2, max_new_tokens=8, groups_per_generate=2)
    d["data"].update(prompts_per_step=2)
    d["grpo"].update(kl_coef=0.0)
    d["adapter"]["svd_cache_dir"] = str(tmp_path / "svd")
    d.update(over)
    p = tmp_path / "preset.yaml"
    p.write_text(yaml.safe_dump(d))
    return str(p)


def sweep_yaml(tmp_path, preset, seeds=(0, 1), arms=("vanilla",), **extra):
    d = {"name": "t", "out": str(tmp_path / "sw"), "seeds": list(seeds),
         "arms": {a: {"config": preset, "set": [f"arm.name={a}"] if a != "vanilla" else []} for a in arms}}
    d.update(extra)
    p = tmp_path / "sweep.yaml"
    p.write_text(yaml.safe_dump(d, sort_keys=False))
    return str(p)


def fake_run(d, ckpt_steps=(), metric_steps=()):
    os.makedirs(d, exist_ok=True)
    for s in ckpt_steps:
        open(os.path.join(d, f"ckpt_{s:06d}.safetensors"), "wb").close()
    with open(os.path.join(d, "metrics.jsonl"), "w") as f:
        for s in metric_steps:
            f.write(json.dumps({"step": s, "hack_rate": 0.0, "pass_rate": 0.0}) + "\n")


def test_plan_is_seed_major_and_passes_vhack(tmp_path):
    preset = tiny_preset(tmp_path)
    cfg = sweep_yaml(tmp_path, preset, seeds=[3, 7], arms=("vanilla", "projected"),
                     extract={"config": preset, "per_seed": True, "args": ["--k", "2"]})
    with pytest.raises(UserError, match="vhack: true but the sweep has no extract"):
        bad = yaml.safe_load(open(cfg))
        bad.pop("extract")
        bad["arms"]["projected"]["vhack"] = True
        (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
        S.load_sweep(str(tmp_path / "bad.yaml"))
    d = yaml.safe_load(open(cfg))
    d["arms"]["projected"]["vhack"] = True
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(d, sort_keys=False))
    sw = S.load_sweep(cfg)
    runs = S.plan(sw)
    assert [r["name"] for r in runs] == ["vanilla-s3", "projected-s3", "vanilla-s7", "projected-s7"]
    assert runs[3]["set"] == ["arm.name=projected", "seed=7", f"arm.vhack_path={tmp_path}/sw/vhack-s7.safetensors"]
    assert runs[0]["set"] == ["seed=3"]
    jobs = S.extract_jobs(sw)
    assert [j[0] for j in jobs] == [3, 7]
    assert jobs[1][2][-4:] == ["--k", "2", "--set", "seed=7"]


def test_config_errors_name_the_key(tmp_path):
    preset = tiny_preset(tmp_path)
    for bad, msg in (({"seeds": [0, 0]}, "lists a seed twice"), ({"bogus": 1}, "unknown sweep key bogus"),
                     ({"arms": {"vanilla": {"config": "nope.yaml"}}}, "arms.vanilla.config points at nope.yaml"),
                     ({"gpus": [0, 0]}, "lists a GPU twice")):
        p = sweep_yaml(tmp_path, preset, **{k: v for k, v in bad.items() if k != "arms"})
        d = yaml.safe_load(open(p))
        d.update(bad)
        open(p, "w").write(yaml.safe_dump(d))
        with pytest.raises(UserError, match=msg):
            S.load_sweep(p)


def test_skip_finished_and_status(tmp_path):
    preset = tiny_preset(tmp_path, steps=5)
    cfg = sweep_yaml(tmp_path, preset, seeds=[0, 1, 2])
    out = tmp_path / "sw"
    fake_run(str(out / "vanilla-s0"), ckpt_steps=(2, 5), metric_steps=range(1, 6))   # final checkpoint: finished
    fake_run(str(out / "vanilla-s1"), ckpt_steps=(2,), metric_steps=range(1, 6))     # all rows, no final ckpt
    sw = S.load_sweep(cfg)
    runs = {r["name"]: r for r in S.plan(sw)}
    assert S.is_finished(runs["vanilla-s0"])
    assert not S.is_finished(runs["vanilla-s1"])   # killed before its final checkpoint: resumed, not skipped
    assert not S.is_finished(runs["vanilla-s2"])
    assert S.train_argv(runs["vanilla-s1"])[-2:] == ["--resume", str(out / "vanilla-s1")]
    assert "--config" in S.train_argv(runs["vanilla-s2"])
    lines = []
    assert S.run_sweep(sw, dry_run=True, log=lines.append) == 0
    assert lines[0] == "vanilla-s0: finished, skipped"
    assert [ln for ln in lines if ln.startswith("would run")] == [
        "would run: " + " ".join(S.train_argv(runs["vanilla-s1"])),
        "would run: " + " ".join(S.train_argv(runs["vanilla-s2"]))]
    # A state file that says vanilla-s2 failed; status merges it with what the run dirs say.
    st = S.State(sw)
    st.set("vanilla-s2", status="failed", rc=1, error="train: boom", attempts=1)
    assert not [f for f in os.listdir(out) if ".tmp" in f]
    p = subprocess.run([sys.executable, "-m", "pgrpo", "sweep", "status", "--config", cfg],
                       capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 0, p.stderr
    rows = {ln.split()[0]: ln for ln in p.stdout.splitlines()[2:-1]}
    assert rows["vanilla-s0"].split()[1:3] == ["done", "5/5"]
    assert rows["vanilla-s1"].split()[1:3] == ["interrupted", "5/5"] and "resumes from checkpoint" in rows["vanilla-s1"]
    assert rows["vanilla-s2"].split()[1] == "failed" and "rc=1" in rows["vanilla-s2"] and "boom" in rows["vanilla-s2"]
    assert p.stdout.splitlines()[-1] == "total: 1 done, 1 failed, 1 interrupted of 3; left: 2"


def _wait(pred, timeout, what):
    t0 = time.time()
    while time.time() - t0 < timeout:
        v = pred()
        if v:
            return v
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


@pytest.mark.slow
def test_sweep_end_to_end_kill_and_resume(tmp_path):
    """Two tiny real runs; the first is SIGKILLed after its first checkpoint. The sweep reports it failed,
    finishes the second, and a second invocation resumes the first from its checkpoint and skips the second."""
    preset = tiny_preset(tmp_path, steps=4)
    cfg = sweep_yaml(tmp_path, preset, seeds=[0, 1])
    out = tmp_path / "sw"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    sweep = subprocess.Popen([sys.executable, "-m", "pgrpo", "sweep", "--config", cfg], cwd=ROOT, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait(lambda: os.path.exists(out / "vanilla-s0" / "ckpt_000001.safetensors"), 120, "first checkpoint")
        state = json.loads((out / "sweep-state.json").read_text())
        pid = state["runs"]["vanilla-s0"]["pid"]
        os.killpg(pid, signal.SIGKILL)          # the trainer and its grader child, mid-run
        text, _ = sweep.communicate(timeout=180)
    finally:
        if sweep.poll() is None:
            sweep.kill()
    assert sweep.returncode == 1, text
    assert "vanilla-s0: FAILED (train, rc=-9)" in text
    assert "vanilla-s1: done" in text
    assert S.checkpoint_step(str(out / "vanilla-s0")) < 4
    st = subprocess.run([sys.executable, "-m", "pgrpo", "sweep", "status", "--config", cfg], cwd=ROOT,
                        capture_output=True, text=True)
    assert "total: 1 done, 1 failed of 2; left: 1" in st.stdout, st.stdout
    # Second invocation: resume the killed run, skip the finished one.
    p = subprocess.run([sys.executable, "-m", "pgrpo", "sweep", "--config", cfg], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "vanilla-s1: finished, skipped" in p.stdout
    assert "vanilla-s0: resume" in p.stdout and "vanilla-s0: done" in p.stdout
    log = (out / "vanilla-s0" / "sweep.log").read_text()
    assert "resume: " in log
    assert S.checkpoint_step(str(out / "vanilla-s0")) == 4
    steps = [json.loads(ln)["step"] for ln in (out / "vanilla-s0" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    st = subprocess.run([sys.executable, "-m", "pgrpo", "sweep", "status", "--config", cfg], cwd=ROOT,
                        capture_output=True, text=True)
    assert st.stdout.splitlines()[-1] == "total: 2 done of 2", st.stdout
    state = json.loads((out / "sweep-state.json").read_text())
    assert state["runs"]["vanilla-s0"]["attempts"] == 2 and state["runs"]["vanilla-s0"]["status"] == "done"
    # The report reads the sweep directory directly (partial: one arm only -> inconclusive).
    r = subprocess.run([sys.executable, "-m", "pgrpo", "report", str(out), "--out", str(tmp_path / "rep")],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("verdict: inconclusive")


@pytest.mark.slow
def test_sweep_one_run_per_gpu(tmp_path):
    """gpus: [0, 1] runs the two runs at the same time, each pinned with its own CUDA_VISIBLE_DEVICES
    (on a machine without GPUs the trainer falls back to CPU; the pinning is what is checked, through
    after_run, which inherits the run's environment)."""
    preset = tiny_preset(tmp_path, steps=1)
    probe = "import os, sys; open(sys.argv[1] + '/gpu.txt', 'w').write(os.environ['CUDA_VISIBLE_DEVICES'])"
    cfg = sweep_yaml(tmp_path, preset, seeds=[0, 1], gpus=[0, 1], after_run=["{python}", "-c", probe, "{run}"])
    p = subprocess.run([sys.executable, "-m", "pgrpo", "sweep", "--config", cfg], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    out = tmp_path / "sw"
    gpus = {(out / r / "gpu.txt").read_text() for r in ("vanilla-s0", "vanilla-s1")}
    assert gpus == {"0", "1"}
    runs = json.loads((out / "sweep-state.json").read_text())["runs"]
    a, b = runs["vanilla-s0"], runs["vanilla-s1"]
    assert a["started"] < b["ended"] and b["started"] < a["ended"]     # they overlapped in time
    assert os.path.exists(out / "vanilla-s0" / "SWEEP_DONE")


def test_after_run_failure_is_retried(tmp_path):
    # With an after_run hook, a run whose training finished but whose hook did not succeed is not skipped.
    preset = tiny_preset(tmp_path, steps=3)
    cfg = sweep_yaml(tmp_path, preset, seeds=[0], after_run=["{python}", "-c", "pass"])
    sw = S.load_sweep(cfg)
    run = S.plan(sw)[0]
    fake_run(run["dir"], ckpt_steps=(3,), metric_steps=(1, 2, 3))
    assert S.is_finished(run) and not S.is_finished(run, need_marker=True)
    lines = []
    S.run_sweep(sw, dry_run=True, log=lines.append)
    assert "would run: " + " ".join(S.train_argv(run)) in lines and "--resume" in S.train_argv(run)
    open(os.path.join(run["dir"], S.DONE_FILE), "w").close()
    lines = []
    S.run_sweep(sw, dry_run=True, log=lines.append)
    assert lines[0] == "vanilla-s0: finished, skipped"


def test_gpu_sets_validate_and_plan_one_torchrun_per_set(tmp_path):
    preset = tiny_preset(tmp_path)
    for bad, msg in (([[0, 1], [1, 2]], "lists a GPU twice"), ([[]], "non-empty GPU sets"), ([[0, True]], "GPU sets")):
        with pytest.raises(UserError, match=msg):
            S.load_sweep(sweep_yaml(tmp_path, preset, gpus=bad))
    sw = S.load_sweep(sweep_yaml(tmp_path, preset, seeds=[0], gpus=[[0, 1, 2, 3], [4, 5, 6, 7]]))
    assert sw["gpus"] == ["0,1,2,3", "4,5,6,7"]
    lines = []
    S.run_sweep(sw, dry_run=True, log=lines.append)
    assert any("torch.distributed.run --standalone --nproc_per_node 4 --max-restarts 0 -m pgrpo train" in ln
               for ln in lines), lines


@pytest.mark.slow
def test_sweep_gpu_set_runs_one_torchrun_over_the_set(tmp_path):
    """gpus: [[0, 1]]: the run is one 2-rank torchrun pinned to both (no GPU here: the ranks fall back to CPU and
    gloo, which is the same code path as NCCL apart from the backend)."""
    preset = tiny_preset(tmp_path, steps=2)
    probe = "import os, sys; open(sys.argv[1] + '/gpu.txt', 'w').write(os.environ['CUDA_VISIBLE_DEVICES'])"
    cfg = sweep_yaml(tmp_path, preset, seeds=[0], gpus=[[0, 1]], after_run=["{python}", "-c", probe, "{run}"])
    p = subprocess.run([sys.executable, "-m", "pgrpo", "sweep", "--config", cfg], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    run = tmp_path / "sw" / "vanilla-s0"
    assert (run / "gpu.txt").read_text() == "0,1" and (run / "SWEEP_DONE").exists()
    log = (run / "sweep.log").read_text()
    assert "dist: rank 0/2" in log and "dist: rank 1/2" in log and "on GPUs 0,1 (2 ranks)" in p.stdout
    assert [json.loads(ln)["step"] for ln in open(run / "metrics.jsonl")] == [1, 2]


def test_parallel_cpu_runs_overlap(tmp_path):
    """parallel: 2 (no gpus) runs two CPU runs at a time; bad values name the key."""
    preset = tiny_preset(tmp_path, steps=1)
    cfg = sweep_yaml(tmp_path, preset, seeds=[0, 1], parallel=2)
    assert S.load_sweep(cfg)["parallel"] == 2
    p = subprocess.run([sys.executable, "-m", "pgrpo", "sweep", "--config", cfg], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    runs = json.loads((tmp_path / "sw" / "sweep-state.json").read_text())["runs"]
    a, b = runs["vanilla-s0"], runs["vanilla-s1"]
    assert a["started"] < b["ended"] and b["started"] < a["ended"] and a["gpu"] is None
    for bad, why in ((0, "parallel must be an integer >= 1"), ("2", "parallel must be an integer >= 1")):
        with pytest.raises(UserError, match=why):
            S.load_sweep(sweep_yaml(tmp_path, preset, parallel=bad))
    with pytest.raises(UserError, match="exclude each other"):
        S.load_sweep(sweep_yaml(tmp_path, preset, parallel=2, gpus=[0, 1]))
