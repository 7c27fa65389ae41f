"""Trackers beside the trainer's own /metrics: the TensorBoard sink (read back with TensorBoard's own event
reader) and the sweep's Prometheus file-based service discovery (scraped by a real Prometheus)."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from helpers import free_port
from test_deploy import Proc, need, prom_query
from test_sweep import sweep_yaml, tiny_preset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FDR = os.path.join(ROOT, "jobs", "fast-dev-run.yaml")


def pgrpo(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "pgrpo", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=timeout, env=dict(os.environ, PYTHONUNBUFFERED="1"))


def test_tensorboard_scalars_per_step_read_back(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    d = str(tmp_path / "run")
    quick = ["--set", "rollout.max_new_tokens=8", "--set", "grader_workers=1", "--set", "checkpoint_every=1"]
    p = pgrpo("train", "--config", FDR, "--out", d, *quick, "--set", "steps=2", "--set", "logging.tensorboard=true")
    assert p.returncode == 0, p.stderr[-2000:]
    p = pgrpo("train", "--resume", d, "--set", "steps=3")   # a resumed run appends to the same curves
    assert p.returncode == 0, p.stderr[-2000:]
    rows = [json.loads(x) for x in open(os.path.join(d, "metrics.jsonl"))]
    ea = EventAccumulator(os.path.join(d, "tensorboard"))
    ea.Reload()
    tags = ea.Tags()["scalars"]
    for key in ("reward_mean", "hack_rate", "pass_rate", "loss", "kl", "lr", "grad_norm"):
        assert f"train/{key}" in tags, tags
        got = [(e.step, e.value) for e in ea.Scalars(f"train/{key}")]
        assert [s for s, _ in got] == [1, 2, 3]
        assert [v for _, v in got] == pytest.approx([r[key] for r in rows], rel=1e-6)
    assert [e.step for e in ea.Scalars("timing/total")] == [1, 2, 3]


def test_tensorboard_off_by_default_and_a_missing_package_is_one_sentence(tmp_path):
    from pgrpo import config as C
    assert C.Config().logging.tensorboard is False and C.Config().logging.rollouts is True
    # the trainer without the tensorboard package installed (import blocked): one sentence before any step
    code = ("import sys; sys.modules['tensorboard'] = None; from pgrpo.cli import main; "
            "sys.exit(main(sys.argv[1:]))")
    p = subprocess.run([sys.executable, "-c", code, "train", "--config", FDR, "--out", str(tmp_path / "r"), "--set",
                        "logging.tensorboard=true", "--set", "rollout.max_new_tokens=8"], capture_output=True,
                       text=True, cwd=ROOT, timeout=180)
    assert p.returncode == 2 and "tensorboard package is not installed" in p.stderr, p.stderr[-2000:]
    assert "Traceback" not in p.stderr and "TIMING" not in p.stdout
    assert not (tmp_path / "r").exists()   # a start-up check: nothing was written


def test_sweep_targets_scraped_by_a_real_prometheus(tmp_path):
    exe = need("prometheus")
    preset = tiny_preset(tmp_path, steps=400)
    base = free_port()
    cfg = sweep_yaml(tmp_path, preset, seeds=[0, 1], gpus=["a", "b"], metrics_port_base=base,
                     metrics_host="127.0.0.1")
    sd = tmp_path / "sw" / "prometheus-targets.json"
    prom_port = free_port()
    (tmp_path / "prom.yml").write_text(json.dumps({
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [{"job_name": "pgrpo-sweep", "file_sd_configs": [{"files": [str(sd)],
                                                                          "refresh_interval": "1s"}]}]}))
    prom = Proc([exe, f"--config.file={tmp_path / 'prom.yml'}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                 f"--web.listen-address=127.0.0.1:{prom_port}", "--log.level=warn"])
    sweep = Proc([sys.executable, "-m", "pgrpo", "sweep", "--config", cfg], cwd=ROOT)
    try:
        deadline, seen = time.time() + 240, {}
        while time.time() < deadline and len(seen) < 2:
            assert sweep.p.poll() is None, sweep.text()
            try:
                for s in json.loads(prom_api(prom_port, 'pgrpo_steps_total{job="pgrpo-sweep"} > 0')):
                    seen[s["metric"]["sweep_run"]] = s["metric"]
            except OSError:
                pass
            time.sleep(1)
        assert set(seen) == {"vanilla-s0", "vanilla-s1"}, (seen, sweep.text()[-2000:])
        # one target per running run, each on its own port, labelled with the run's own identity
        groups = json.loads(sd.read_text())
        ports = sorted(int(g["targets"][0].rsplit(":", 1)[1]) for g in groups)
        assert len(groups) == 2 and len(set(ports)) == 2 and ports[0] >= base
        assert {m["instance"] for m in seen.values()} == {f"127.0.0.1:{p}" for p in ports}
        assert {(m["run"], m["seed"]) for m in seen.values()} == {("vanilla-s0", "0"), ("vanilla-s1", "1")}
        assert prom_query(prom_port, 'count(up{job="pgrpo-sweep"} == 1)') == [2.0]
    finally:
        rc = sweep.stop(signal.SIGTERM, timeout=60)
        prom.stop()
    assert rc == 143 and json.loads(sd.read_text()) == []   # stopped runs leave no targets behind


def prom_api(port, expr):
    import urllib.parse
    import urllib.request
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.dumps(json.load(r)["data"]["result"])
