"""Containers and dashboards, checked without a Docker engine.

- docker-compose.yml validates (`docker-compose config`) and isolates the grader as promised;
- deploy/prometheus/prometheus.yml passes `promtool check config`;
- the Grafana dashboard uses the provisioned datasource uid, parses as PromQL (`promtool check rules`) and only
  names metrics of the trainer's contract;
- a real Prometheus, with the project's scrape config pointed at loopback, scrapes a real fast-dev-run started
  through the image's entrypoint, and every dashboard expression returns data; the restarted entrypoint resumes;
- the grader target's file set serves without torch; a grader in a fresh network namespace grades over the
  Unix socket while code that reaches for the network fails inside it (and succeeds without the namespace).

Each check that needs a binary (docker-compose, promtool, prometheus, unshare/bwrap) is skipped, with the
reason, only when that binary is missing.
"""
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from helpers import free_port
import yaml

from pgrpo.data.problems import builtin_problems
from pgrpo.grader.client import GraderClient

REPO = Path(__file__).resolve().parents[1]
COMPOSE = REPO / "docker-compose.yml"
DOCKERFILE = REPO / "Dockerfile"
PROM_CFG = REPO / "deploy" / "prometheus" / "prometheus.yml"
DASHBOARD = REPO / "deploy" / "grafana" / "dashboards" / "pgrpo.json"
DS_PROVISION = REPO / "deploy" / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
DASH_PROVISION = REPO / "deploy" / "grafana" / "provisioning" / "dashboards" / "pgrpo.yml"
ENTRYPOINT = REPO / "deploy" / "entrypoint.sh"
HEALTHCHECK = REPO / "deploy" / "healthcheck.py"
VENV_BIN = Path(sys.executable).parent

# The team's metric contract (pgrpo/metrics.py implements it): name -> type.
CONTRACT = {
    "pgrpo_step_phase_seconds": "histogram",
    "pgrpo_steps_total": "counter",
    "pgrpo_tokens_generated_total": "counter",
    "pgrpo_skipped_groups_total": "counter",
    "pgrpo_grader_requests_total": "counter",
    "pgrpo_reward_mean": "gauge",
    "pgrpo_hack_ratio": "gauge",
    "pgrpo_pass_ratio": "gauge",
    "pgrpo_projection_removed_ratio": "gauge",
    "pgrpo_projection_fired_ratio": "gauge",
    "pgrpo_grad_vhack_cosine": "gauge",
    "pgrpo_update_along_vhack": "gauge",
    "pgrpo_delta_s_hack_norm": "gauge",
    "pgrpo_vhack_overlap": "gauge",
    "pgrpo_probe_hack_probability": "gauge",
    "pgrpo_rollout_grad_vhack_cosine_hack": "gauge",
    "pgrpo_rollout_grad_vhack_cosine_other": "gauge",
    "pgrpo_last_checkpoint_timestamp_seconds": "gauge",
}
SERIES_SUFFIXES = {"histogram": ("_bucket", "_sum", "_count"), "counter": ("",), "gauge": ("",)}
SERIES = {name + suf: name for name, kind in CONTRACT.items() for suf in SERIES_SUFFIXES[kind]}

PROBLEM = {p.id: p for p in builtin_problems()}["b001"]   # sumOfEvens(nums) -> int


def need(binary):
    path = shutil.which(binary)
    if path is None:
        pytest.skip(f"`{binary}` is not installed (apt-get install {binary})")
    return path


def load_yaml(path):
    with open(path) as f:
        return yaml.safe_load(f)


def compose():
    return load_yaml(COMPOSE)


# ----------------------------------------------------------------------------- compose

def test_docker_compose_config_validates():
    exe = need("docker-compose")
    env = {k: v for k, v in os.environ.items() if k != "COMPOSE_FILE"}
    p = subprocess.run([exe, "-f", str(COMPOSE), "config", "-q"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    p = subprocess.run([exe, "-f", str(COMPOSE), "--profile", "cpu", "config", "--services"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert set(p.stdout.split()) == {"grader", "extract", "train-projected", "train-vanilla", "train-cpu",
                                     "prometheus", "grafana"}
    # the environment knobs reach the resolved file
    p = subprocess.run([exe, "-f", str(COMPOSE), "config"], cwd=REPO, capture_output=True, text=True, timeout=60,
                       env=dict(env, SEED="3", PROJECTED_PRESET="smoke-projected", GRADER_WORKERS="7",
                                GRADER_CPUS="3"))
    assert p.returncode == 0, p.stderr
    resolved = yaml.safe_load(p.stdout)["services"]
    assert resolved["train-projected"]["environment"]["PGRPO_SEED"] == "3"
    assert resolved["train-projected"]["environment"]["PGRPO_PRESET"] == "smoke-projected"
    assert "7" in resolved["grader"]["command"]
    assert float(resolved["grader"]["cpus"]) == 3


def test_grader_service_is_isolated():
    g = compose()["services"]["grader"]
    assert g["network_mode"] == "none"
    assert "networks" not in g and "ports" not in g and "expose" not in g
    assert g["read_only"] is True
    tmpfs = g["tmpfs"] if isinstance(g["tmpfs"], list) else [g["tmpfs"]]
    assert tmpfs and all(re.search(r"size=\d+[kmg]", t) for t in tmpfs), tmpfs   # writable, but small
    assert g["cap_drop"] == ["ALL"] and not g.get("cap_add")
    assert "no-new-privileges:true" in g["security_opt"]
    assert not g.get("privileged", False)
    assert isinstance(g["pids_limit"], int) and 0 < g["pids_limit"] <= 4096
    assert re.fullmatch(r"\d+[mg]", str(g["mem_limit"]))
    # a CPU bound from a variable whose default fits any host (Docker refuses more CPUs than the host has)
    m = re.fullmatch(r"\$\{GRADER_CPUS:-([\d.]+)\}", str(g["cpus"]))
    assert m and 0 < float(m.group(1)) <= 1, g["cpus"]
    uid = str(g["user"]).split(":")[0]
    assert uid not in ("0", "root") and uid.isdigit()
    assert g["init"] is True
    # its only mount is the socket volume, a named volume shared with the trainers (no bind mount of the host)
    assert g["volumes"] == ["grader-sock:/sock"]
    sock = g["command"][g["command"].index("--socket") + 1]
    assert sock.startswith("/sock/")
    assert "--no-bwrap" in g["command"]   # bwrap is not in the image; the container is the sandbox
    assert g["healthcheck"]["test"][0] == "CMD" and sock in g["healthcheck"]["test"]
    assert "gpu" not in json.dumps(g)


def test_trainer_services_gpu_ordering_and_volumes():
    svcs = compose()["services"]
    sock = svcs["grader"]["command"][svcs["grader"]["command"].index("--socket") + 1]
    for name in ("train-projected", "train-vanilla"):
        s = svcs[name]
        (dev,) = s["deploy"]["resources"]["reservations"]["devices"]
        assert dev["driver"] == "nvidia" and dev["capabilities"] == ["gpu"]
        assert s["depends_on"]["grader"]["condition"] == "service_healthy"
        assert s["depends_on"]["extract"]["condition"] == "service_completed_successfully"
        env = s["environment"]
        assert re.fullmatch(r"\$\{[A-Z_]+:-[a-z-]+\}", env["PGRPO_PRESET"]), env   # preset from env, with a default
        assert re.fullmatch(r"\$\{SEED:-\d+\}", str(env["PGRPO_SEED"]))
        assert "PGRPO_RUN" in env and env["PGRPO_GRADER_SOCKET"] == sock
        vols = {v.split(":")[1]: v for v in s["volumes"]}
        assert vols["/runs"] == "runs:/runs" and vols["/cache"] == "hf-cache:/cache"   # resume across restarts
        assert vols["/sock"] == "grader-sock:/sock:ro"
        assert s["restart"].startswith("on-failure")
        assert s["networks"] == ["train"]
        assert (REPO / "jobs" / (env["PGRPO_PRESET"].split(":-")[1].rstrip("}") + ".yaml")).is_file()
    ex = svcs["extract"]
    assert ex["command"] == ["extract"] and ex["restart"] == "no" and "vhack:/vhack" in ex["volumes"]
    cpu = svcs["train-cpu"]
    assert cpu["profiles"] == ["cpu"] and "deploy" not in cpu and "extract" not in cpu["depends_on"]
    assert "fast-dev-run" in cpu["environment"]["PGRPO_PRESET"]
    # monitoring: pinned images, Prometheus on the trainers' network, config and dashboards from deploy/
    for name in ("prometheus", "grafana"):
        image = svcs[name]["image"]
        assert re.search(r":v?\d+\.\d+\.\d+$", image), image
        assert svcs[name]["networks"] == ["train"]
    assert "./deploy/prometheus/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in svcs["prometheus"]["volumes"]


def test_dockerfile_targets():
    text = DOCKERFILE.read_text()
    args = dict(re.findall(r"^ARG (\w+)=(\S+)", text, re.M))
    stages = dict((m.group(2), m.group(1)) for m in re.finditer(r"^FROM (\S+) AS (\w+)", text, re.M))
    assert set(stages) == {"build", "grader", "runtime"}
    images = {k: args[v[2:-1]] if v.startswith("${") else v for k, v in stages.items()}
    for image in images.values():
        assert ":" in image and not image.endswith(":latest"), image
    # CUDA major of the devel base == CUDA build of the pinned torch
    cuda = re.search(r"nvidia/cuda:(\d+)\.", images["build"]).group(1)
    assert args["TORCH_VERSION"] == "2.14.1" and args["TORCH_INDEX_URL"].endswith(f"/cu{cuda}0")
    arch = args["TORCH_CUDA_ARCH_LIST"].strip('"').split(";")
    assert {"8.0", "9.0"} <= set(arch) and any(a.startswith(("10.", "12.")) for a in arch)   # Ampere Hopper Blackwell
    assert "FORCE_CUDA=1" in text
    body = {name: text.split(f" AS {name}\n", 1)[1].split("\nFROM ", 1)[0] for name in stages}
    grader = "\n".join(line for line in body["grader"].splitlines() if not line.lstrip().startswith("#"))
    assert "torch" not in grader and "pip install" not in grader and "cuda" not in grader.lower()
    for name in ("grader", "runtime"):
        assert re.search(r"^USER \$\{APP_UID\}", body[name], re.M) and "HEALTHCHECK" in body[name]
    ignored = (REPO / ".dockerignore").read_text().split()
    assert ".venv" in ignored and "runs" in ignored and ".git" in ignored


# ----------------------------------------------------------------------------- Prometheus config

def test_promtool_check_config():
    exe = need("promtool")
    p = subprocess.run([exe, "check", "config", str(PROM_CFG)], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr
    # every trainer service of the compose file is a scrape target on the port the trainers serve
    svcs = compose()["services"]
    targets = {t for job in load_yaml(PROM_CFG)["scrape_configs"] for sc in job.get("static_configs", [])
               for t in sc["targets"]}
    for name, s in svcs.items():
        if name.startswith("train-"):
            port = (s.get("environment") or {}).get("PGRPO_METRICS_PORT") or "9400"
            assert f"{name}:{port}" in targets, (name, targets)


# Compose deploys Prometheus 3.x (a supported LTS line); CI's promtool/prometheus come from Debian and are 2.x, and no
# registry CI may use (PyPI, npm, Debian) ships a 3.x build. So the config keeps to keys whose meaning is the same in
# both majors (none of 3.0's renamed or re-defaulted settings: scrape_protocols, fallback_scrape_protocol,
# *_classic_histograms, metric_name_validation_scheme, ...), and this test fails if one creeps in.
PROM_COMMON = {"global": {"scrape_interval", "evaluation_interval", "scrape_timeout"},
               "scrape": {"job_name", "metrics_path", "static_configs", "file_sd_configs", "scrape_interval",
                          "scrape_timeout"},
               "static": {"targets", "labels"}, "file_sd": {"files", "refresh_interval"}}


def test_prometheus_config_keeps_to_keys_common_to_2_and_3():
    image = compose()["services"]["prometheus"]["image"]
    assert re.fullmatch(r"prom/prometheus:v3\.\d+\.\d+", image), image
    cfg = load_yaml(PROM_CFG)
    assert set(cfg) <= {"global", "scrape_configs"} and set(cfg["global"]) <= PROM_COMMON["global"]
    for job in cfg["scrape_configs"]:
        assert set(job) <= PROM_COMMON["scrape"], job
        for sc in job.get("static_configs", []):
            assert set(sc) <= PROM_COMMON["static"], sc
        for sd in job.get("file_sd_configs", []):
            assert set(sd) <= PROM_COMMON["file_sd"], sd


# ----------------------------------------------------------------------------- dashboard

PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless",
                "offset", "inf", "nan"}


def metric_names(expr):
    """Metric names an expression reads: drop strings, label matchers, ranges and grouping clauses, then keep
    the identifiers that are not functions (followed by '(') or PromQL keywords."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    e = re.sub(r"\{[^}]*\}", " ", e)
    e = re.sub(r"\[[^\]]*\]", " ", e)
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", e)
    names = set()
    for m in re.finditer(r"(?<![\w.$])[A-Za-z_:][A-Za-z0-9_:]*", e):
        if e[m.end():].lstrip().startswith("(") or m.group(0).lower() in PROMQL_WORDS:
            continue
        names.add(m.group(0))
    return names


def concrete(expr):
    """Grafana variables -> values Prometheus accepts: windows -> 1m, template variables -> match anything."""
    expr = re.sub(r"\$\{?(__rate_interval|__interval|__range|window)\}?", "1m", expr)
    return re.sub(r"\$\{?\w+\}?", ".*", expr)


def dashboard():
    with open(DASHBOARD) as f:
        return json.load(f)


def all_panels(dash):
    for p in dash["panels"]:
        yield p
        yield from p.get("panels", [])


def dashboard_exprs(dash):
    return [(p["title"], t["expr"]) for p in all_panels(dash) for t in p.get("targets", [])]


def variable_queries(dash):
    """label_values(SELECTOR, label) of the query variables -> equivalent PromQL `count by (label) (SELECTOR)`."""
    out = []
    for v in dash["templating"]["list"]:
        if v["type"] != "query":
            continue
        q = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
        m = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", q.strip())
        assert m, f"variable {v['name']}: unsupported query {q!r}"
        out.append((f"variable {v['name']}", f"count by ({m.group(2)}) ({m.group(1)})"))
    return out


def test_contract_matches_the_trainer_registry():
    """The names the dashboard may use are exactly what pgrpo/metrics.py exposes (no HTTP: port 0)."""
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families
    from pgrpo.metrics import Metrics
    m = Metrics("r", "vanilla", 0)
    fams = {f.name: f.type for f in text_string_to_metric_families(generate_latest(m.registry).decode())
            if not f.name.endswith("_created")}   # prometheus_client's creation-time series, not ours
    # the parser strips the counters' _total from family names
    assert {n if t != "counter" else n + "_total": t for n, t in fams.items()} == CONTRACT


def test_metric_name_parser():
    assert metric_names('sum by (run, le) (rate(a_bucket{x="y{z}"}[$window])) / on(run) group_left b') == {"a_bucket", "b"}
    assert metric_names("3600 * time() - max without (seed) (c_seconds offset 5m) > bool 1e3") == {"c_seconds"}


def test_dashboard_datasource_and_metrics():
    dash = dashboard()
    (ds,) = load_yaml(DS_PROVISION)["datasources"]
    uid = ds["uid"]
    assert ds["type"] == "prometheus" and ds["url"] == "http://prometheus:9090"
    panels = [p for p in all_panels(dash) if p["type"] != "row"]
    assert len({p["id"] for p in all_panels(dash)}) == len(list(all_panels(dash)))
    used = set()
    for p in panels:
        assert p["datasource"] == {"type": "prometheus", "uid": uid}, p["title"]
        assert p["targets"], p["title"]
        for t in p["targets"]:
            assert t["datasource"]["uid"] == uid, p["title"]
            names = metric_names(t["expr"])
            assert names, (p["title"], t["expr"])
            unknown = names - set(SERIES)
            assert not unknown, f"panel {p['title']!r} uses metrics outside the contract: {unknown}"
            used |= {SERIES[n] for n in names}
    for v in dash["templating"]["list"]:
        if v["type"] == "query":
            assert v["datasource"]["uid"] == uid
    for _, q in variable_queries(dash):
        assert metric_names(q) <= set(SERIES)
    assert used == set(CONTRACT), f"contract metrics without a panel: {set(CONTRACT) - used}"
    # the asked-for views exist: stacked phase timings, and hack vs pass split per arm
    phase = [p for p in panels if any("pgrpo_step_phase_seconds_sum" in t["expr"] for t in p["targets"])]
    assert phase and phase[0]["fieldConfig"]["defaults"]["custom"]["stacking"]["mode"] == "normal"
    hp = [p for p in panels if {"pgrpo_hack_ratio", "pgrpo_pass_ratio"} <= set().union(
        *(metric_names(t["expr"]) for t in p["targets"]))]
    assert hp and all("by (arm)" in t["expr"] for t in hp[0]["targets"])
    # Grafana loads the file from where compose mounts deploy/grafana/dashboards
    (prov,) = load_yaml(DASH_PROVISION)["providers"]
    mounts = dict(v.split(":")[:2] for v in compose()["services"]["grafana"]["volumes"])
    assert mounts["./deploy/grafana/dashboards"] == prov["options"]["path"]
    assert mounts["./deploy/grafana/provisioning"] == "/etc/grafana/provisioning"


def test_dashboard_exprs_parse_as_promql(tmp_path):
    exe = need("promtool")
    exprs = dashboard_exprs(dashboard()) + variable_queries(dashboard())
    rules = {"groups": [{"name": "dashboard", "rules": [{"record": f"dashboard:expr_{i}", "expr": concrete(e)}
                                                        for i, (_, e) in enumerate(exprs)]}]}
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump(rules))
    p = subprocess.run([exe, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr
    assert f"SUCCESS: {len(exprs)} rules found" in p.stdout


# ----------------------------------------------------------------------------- live: Prometheus x fast-dev-run

class Proc:
    """A child process whose output is collected by a thread (so a chatty child never blocks on a full pipe)."""

    def __init__(self, argv, **kw):
        self.lines = []
        self.p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                  start_new_session=True, **kw)
        self.t = threading.Thread(target=self._read, daemon=True)
        self.t.start()

    def _read(self):
        for line in self.p.stdout:
            self.lines.append(line.rstrip("\n"))

    def text(self):
        return "\n".join(self.lines)

    def seen(self, pattern):
        return any(re.search(pattern, line) for line in list(self.lines))

    def stop(self, sig=signal.SIGTERM, timeout=60):
        if self.p.poll() is None:
            self.p.send_signal(sig)
            try:
                self.p.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.p.pid, signal.SIGKILL)
                self.p.wait()
        self.t.join(timeout=10)
        return self.p.returncode


def prom_query(port, expr):
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=10) as r:
        body = json.load(r)
    assert body["status"] == "success", body
    data = body["data"]
    if data["resultType"] == "scalar":
        return [float(data["result"][1])]
    return [float(s["value"][1]) for s in data["result"]]


def entrypoint_env(run_root, metrics_port):
    env = dict(os.environ)
    env.update(PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}", PGRPO_PRESET="fast-dev-run", PGRPO_SEED="0",
               PGRPO_RUNS_DIR=str(run_root / "runs"), PGRPO_CACHE_DIR=str(run_root / "cache"),
               PGRPO_JOBS_DIR=str(REPO / "jobs"), PGRPO_METRICS_PORT=str(metrics_port), PGRPO_METRICS_LINGER="0")
    for k in ("PGRPO_RUN", "PGRPO_GRADER_SOCKET", "PGRPO_VHACK"):
        env.pop(k, None)
    return env


LIVE_STEPS = 500
IDENTITY = 'count by (run, arm, seed) (pgrpo_steps_total{run="fast-dev-run-seed0", arm="vanilla", seed="0"})'


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    """A real Prometheus (the project's scrape config, targets rewritten to loopback, 1 s scrapes), a grader
    sidecar in a fresh network namespace, and a real fast-dev-run started the way the container starts it
    (deploy/entrypoint.sh train, PGRPO_GRADER_SOCKET pointing at the sidecar). Every dashboard expression
    is queried while the trainer runs; once all have returned data and the mid-run checkpoint is written, the
    trainer gets SIGTERM, as `docker stop` would send."""
    exe = need("prometheus")
    netns = netns_prefix()
    root = tmp_path_factory.mktemp("live")
    prom_port, metrics_port = free_port(), free_port()
    cfg = load_yaml(PROM_CFG)
    cfg["global"].update(scrape_interval="1s", evaluation_interval="1s", scrape_timeout="1s")
    jobs = {j["job_name"]: j for j in cfg["scrape_configs"]}
    jobs["pgrpo-trainer"]["static_configs"] = [{"targets": [f"127.0.0.1:{metrics_port}"],
                                               "labels": {"service": "train-cpu"}}]
    jobs["prometheus"]["static_configs"] = [{"targets": [f"127.0.0.1:{prom_port}"]}]
    cfg_path = root / "prometheus.yml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    prom = Proc([exe, f"--config.file={cfg_path}", f"--storage.tsdb.path={root / 'tsdb'}",
                 f"--web.listen-address=127.0.0.1:{prom_port}", "--log.level=warn"])
    trainer = grader = None
    try:
        # the sidecar, as in compose: its own (empty) network namespace, reached only through the socket
        sock = root / "sock" / "grader.sock"
        sock.parent.mkdir()
        grader = start_grader(netns + [sys.executable, "-m", "pgrpo", "grader", "serve", "--socket", str(sock),
                                       "--workers", "2", "--no-bwrap"], sock)
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{prom_port}/-/ready", timeout=2)
                break
            except OSError:
                assert prom.p.poll() is None and time.monotonic() < deadline, prom.text()
                time.sleep(0.2)

        exprs = dashboard_exprs(dashboard()) + variable_queries(dashboard())
        exprs += [("scrape target up", 'up{job="pgrpo-trainer", service="train-cpu"} == 1'),
                  ("run identity from the environment", IDENTITY),
                  ("graded by the sidecar", 'sum(pgrpo_grader_requests_total{outcome="ok"}) > 0')]
        # pgrpo_vhack_overlap exists only in runs that refresh v_hack (not fast-dev-run); tests/test_metrics.py
        # covers that the gauge is set from a refresh row
        pending = {concrete(e): title for title, e in exprs if "pgrpo_vhack_overlap" not in e}
        answered = {}
        t0 = time.monotonic()
        # far more steps than the checks need, so the run is still training (not finished, not lingering) when
        # it gets SIGTERM, however fast this machine is; checkpoints come every 2 steps (the preset's)
        trainer = Proc(["sh", str(ENTRYPOINT), "train", "--set", f"steps={LIVE_STEPS}"], cwd=REPO,
                       env=dict(entrypoint_env(root, metrics_port), PGRPO_METRICS_LINGER="120",
                                PGRPO_GRADER_SOCKET=str(sock)))
        health_rc = None
        while time.monotonic() - t0 < 420:
            for expr in list(pending):
                values = prom_query(prom_port, expr)
                if any(math.isfinite(v) for v in values):
                    answered[expr] = values
                    del pending[expr]
            if health_rc is None and trainer.seen(r"^TIMING step=1 "):   # the image's HEALTHCHECK command
                health_rc = subprocess.run([sys.executable, str(HEALTHCHECK), "metrics"], timeout=30,
                                           env=dict(os.environ, PGRPO_METRICS_PORT=str(metrics_port))).returncode
            if not pending and trainer.seen(r"^checkpoint: .*ckpt_\d+\.safetensors"):
                break
            if trainer.p.poll() is not None:
                break
            time.sleep(1)
        running = trainer.p.poll() is None
        rc = trainer.stop()   # SIGTERM, like `docker stop`
        yield {"root": root, "prom_port": prom_port, "metrics_port": metrics_port, "pending": pending,
               "answered": answered, "out": trainer.text(), "running": running, "rc": rc, "health_rc": health_rc,
               "seconds": time.monotonic() - t0, "run_dir": root / "runs" / "fast-dev-run-seed0"}
    finally:
        if trainer is not None:
            trainer.stop(signal.SIGKILL)
        if grader is not None:
            grader.stop()
        prom.stop()


@pytest.mark.slow
def test_every_dashboard_expression_returns_data(live):
    assert not live["pending"], (f"no data for {len(live['pending'])} dashboard expressions:\n"
                                 + "\n".join(f"  [{t}] {e}" for e, t in live["pending"].items())
                                 + "\n--- trainer output ---\n" + live["out"][-3000:])
    assert live["running"], "the trainer exited before every expression had data:\n" + live["out"][-3000:]
    assert live["health_rc"] == 0   # deploy/healthcheck.py metrics against the live endpoint ...
    down = subprocess.run([sys.executable, str(HEALTHCHECK), "metrics"], capture_output=True, timeout=30,
                          env=dict(os.environ, PGRPO_METRICS_PORT=str(live["metrics_port"])))
    assert down.returncode == 1   # ... and against the stopped one
    # the environment became the run's identity: run label (queried live, see IDENTITY), dir, seed, cache path
    assert live["answered"][IDENTITY] == [1.0]
    assert "local grader" not in live["out"]   # it used the sidecar in the network namespace
    saved = load_yaml(live["run_dir"] / "config.yaml")
    assert saved["run_name"] == "fast-dev-run-seed0" and saved["seed"] == 0
    assert saved["grader_socket"] == str(live["root"] / "sock" / "grader.sock")
    assert saved["adapter"]["svd_cache_dir"] == str(live["root"] / "cache" / "svd")
    print(f"live dashboard check: {len(live['answered'])} expressions answered in {live['seconds']:.0f}s")


@pytest.mark.slow
def test_restarted_entrypoint_resumes_the_run(live):
    """A stopped container that is started again continues its run from the last checkpoint."""
    run_dir = live["run_dir"]
    ckpts = sorted(f.name for f in run_dir.glob("ckpt_*.safetensors"))
    assert ckpts, live["out"][-2000:]
    last = int(re.search(r"ckpt_(\d+)", ckpts[-1]).group(1))
    assert 2 <= last < LIVE_STEPS, (ckpts, live["out"][-2000:])
    assert live["rc"] != 0   # stopped mid-run by SIGTERM, not finished
    # restart with the same environment. Extra args are appended: `--set steps=<last>` ends the resumed run at
    # the checkpoint it resumes from, which keeps this test short (the trainer's own tests cover resumed steps).
    p = subprocess.run(["sh", str(ENTRYPOINT), "train", "--set", f"steps={last}"], cwd=REPO, capture_output=True,
                       text=True, timeout=400, env=entrypoint_env(live["root"], free_port()))
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-3000:]
    assert f"resuming {run_dir}" in out and f"resume: {run_dir} from step {last}" in out
    assert not re.search(r"^TIMING ", out, re.M) and "new run" not in out
    assert sorted(f.name for f in run_dir.glob("ckpt_*.safetensors")) == ckpts
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, last + 1))   # rows of the interrupted step are not there


@pytest.mark.slow
def test_extract_then_projected_arm_through_the_entrypoint(tmp_path):
    """The compose chain extract -> train-projected, on the tiny smoke preset: `extract` writes the shared
    v_hack (and skips the work when started again), the projected arm trains with it."""
    vhack = tmp_path / "vhack" / "vhack.safetensors"
    env = dict(entrypoint_env(tmp_path, free_port()), PGRPO_PRESET="smoke-projected", PGRPO_VHACK=str(vhack))
    p = subprocess.run(["sh", str(ENTRYPOINT), "extract"], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=400)
    assert p.returncode == 0 and vhack.is_file(), (p.stdout + p.stderr)[-3000:]
    again = subprocess.run(["sh", str(ENTRYPOINT), "extract"], cwd=REPO, env=env, capture_output=True, text=True,
                           timeout=400)
    assert again.returncode == 0 and "up to date" in again.stdout, again.stdout + again.stderr
    p = subprocess.run(["sh", str(ENTRYPOINT), "train", "--set", "steps=1", "--set", "rollout.max_new_tokens=16"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-3000:]
    run_dir = tmp_path / "runs" / "smoke-projected-seed0"
    saved = load_yaml(run_dir / "config.yaml")
    assert saved["arm"]["name"] == "projected" and saved["arm"]["vhack_path"] == str(vhack)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    (row,) = [r for r in rows if r.get("kind", "train") == "train"]   # the preset also logs a held-out eval row
    assert 0 <= row["proj_removed_frac"] <= 1 and (run_dir / "ckpt_000001.safetensors").is_file()


# ----------------------------------------------------------------------------- grader: image file set, no network

def grader_target_tree(dest):
    """Copy exactly what the Dockerfile's `grader` stage copies from the repo into dest (its /app)."""
    stage = DOCKERFILE.read_text().split(" AS grader\n", 1)[1].split("\nFROM ", 1)[0]
    copies = re.findall(r"^COPY (?!--from)(?:--\S+ )*(.+)$", stage, re.M)
    n = 0
    for c in copies:
        *srcs, target = c.split()
        if not target.startswith("/app/"):
            continue
        for src in srcs:
            s = REPO / src
            out = dest / target[len("/app/"):]
            if s.is_dir():
                shutil.copytree(s, out, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                out.mkdir(parents=True, exist_ok=True) if target.endswith("/") else None
                shutil.copy(s, out / s.name if target.endswith("/") else out)
            n += 1
    assert n >= 3, copies
    return dest


def start_grader(argv, sock, env=None, timeout=60):
    p = Proc(argv, env=env)
    deadline = time.monotonic() + timeout
    while True:
        hc = subprocess.run([sys.executable, str(HEALTHCHECK), "grader", str(sock)], capture_output=True, timeout=30)
        if hc.returncode == 0:
            return p
        if p.p.poll() is not None or time.monotonic() > deadline:
            p.stop(signal.SIGKILL)
            pytest.fail(f"grader did not become healthy: {p.text()[-2000:]}")
        time.sleep(0.2)


def block(code):
    return f"```python\n{code}\n```\n"


def test_grader_target_serves_without_torch(tmp_path):
    """The grader image holds python + the files the Dockerfile copies, nothing else: run exactly that with
    site-packages switched off (`-S`: no torch, numpy or yaml) and grade through the socket."""
    app = grader_target_tree(tmp_path / "app")
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(app), "HOME": str(tmp_path),
           "PYTHONDONTWRITEBYTECODE": "1"}
    no_torch = subprocess.run([sys.executable, "-S", "-c", "import torch"], env=env, capture_output=True)
    assert no_torch.returncode != 0   # the check below really runs without torch
    sock = tmp_path / "grader.sock"
    g = start_grader([sys.executable, "-S", "-m", "pgrpo", "grader", "serve", "--socket", str(sock),
                      "--workers", "1", "--no-bwrap"], sock, env=env)
    try:
        (r,) = GraderClient(str(sock), timeout=120).grade(
            [{"problem": PROBLEM, "response": block(PROBLEM.canonical_solution), "mode": "none"}])
        assert r["label"] == "correct" and r["gt_pass"] is True
    finally:
        g.stop()
    gone = subprocess.run([sys.executable, str(HEALTHCHECK), "grader", str(sock)], capture_output=True, timeout=30)
    assert gone.returncode == 1 and b"unhealthy" in gone.stderr   # the compose healthcheck sees a dead grader


NET_RESPONSE = """
class Solution:
    def sumOfEvens(self, nums):
        import socket
        try:
            socket.create_connection(("127.0.0.1", {port}), timeout=2).close()
        except OSError:
            return -1          # no network: a wrong answer
        return sum(x for x in nums if x % 2 == 0)
"""


def netns_prefix():
    """argv prefix that runs a command in a fresh network namespace (only loopback, down)."""
    if os.geteuid() == 0 and shutil.which("unshare"):
        if subprocess.run(["unshare", "-n", "true"], capture_output=True).returncode == 0:
            return ["unshare", "-n"]
    if shutil.which("bwrap"):
        prefix = ["bwrap", "--dev-bind", "/", "/", "--unshare-net", "--die-with-parent", "--"]
        if subprocess.run(prefix + ["true"], capture_output=True).returncode == 0:
            return prefix
    pytest.skip("neither `unshare -n` (as root) nor `bwrap --unshare-net` can create a network namespace here")


def test_grader_in_fresh_network_namespace_has_no_network(tmp_path):
    """What `network_mode: none` gives the grader container, reproduced with a network namespace: the trainer
    side (this process, normal namespace) grades over the Unix socket; code that connects to a TCP listener
    of the host namespace fails inside. The same grader without the namespace reaches it (the control)."""
    prefix = netns_prefix()
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    listener.settimeout(0.1)
    port = listener.getsockname()[1]
    accepted = []

    def accept_loop(stop):
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
                accepted.append(1)
                conn.close()
            except OSError:
                pass
    stop = threading.Event()
    t = threading.Thread(target=accept_loop, args=(stop,), daemon=True)
    t.start()
    items = [{"problem": PROBLEM, "response": block(PROBLEM.canonical_solution), "mode": "none", "id": "honest"},
             {"problem": PROBLEM, "response": block(NET_RESPONSE.format(port=port)), "mode": "none", "id": "net"}]
    serve = [sys.executable, "-m", "pgrpo", "grader", "serve", "--workers", "1", "--no-bwrap", "--socket"]
    try:
        results = {}
        for where, pre in (("isolated", prefix), ("control", [])):
            sock = tmp_path / f"{where}.sock"
            g = start_grader(pre + serve + [str(sock)], sock)
            try:
                before = len(accepted)
                results[where] = GraderClient(str(sock), timeout=120).grade(items)
                results[where + "_connections"] = len(accepted) - before
            finally:
                g.stop()
        honest, net = results["isolated"]
        assert honest["label"] == "correct" and honest["gt_pass"] is True
        assert net["gt_pass"] is False and net["label"] == "incorrect" and net["can_compile"] is True
        assert results["isolated_connections"] == 0
        # without the namespace the grader's own layers still keep the job off the network (a per-job network
        # namespace where user namespaces work, Landlock's TCP rule, seccomp's socket rule in the flat mode) ...
        honest, net = results["control"]
        assert honest["label"] == "correct" and net["label"] == "incorrect", net
        assert results["control_connections"] == 0
        # ... while the same code outside any sandbox reaches the listener (so the test can fail)
        direct = subprocess.run([sys.executable, "-c", NET_RESPONSE.format(port=port) +
                                 "\nassert Solution().sumOfEvens([2]) == 2\n"], capture_output=True, timeout=60)
        assert direct.returncode == 0, direct.stderr[-500:]
    finally:
        stop.set()
        t.join(timeout=5)
        listener.close()


def test_compose_gpu_count_per_arm_reaches_the_entrypoint():
    """PROJECTED_NGPU / VANILLA_NGPU: the GPUs (torchrun ranks) of each arm; *_GPU lists that many device ids."""
    exe = need("docker-compose")
    env = {k: v for k, v in os.environ.items() if k != "COMPOSE_FILE"}
    for extra, want in (({}, ("1", "1", ["0"])), ({"PROJECTED_NGPU": "4", "PROJECTED_GPU": "0,1,2,3"}, ("4", "1", ["0,1,2,3"]))):
        p = subprocess.run([exe, "-f", str(COMPOSE), "config"], cwd=REPO, capture_output=True, text=True, timeout=60,
                           env=dict(env, **extra))
        assert p.returncode == 0, p.stderr
        svcs = yaml.safe_load(p.stdout)["services"]
        assert str(svcs["train-projected"]["environment"]["PGRPO_NPROC"]) == want[0]
        assert str(svcs["train-vanilla"]["environment"]["PGRPO_NPROC"]) == want[1]
        (dev,) = svcs["train-projected"]["deploy"]["resources"]["reservations"]["devices"]
        assert [str(d) for d in dev["device_ids"]] == want[2]


def test_entrypoint_launches_torchrun_for_several_ranks(tmp_path):
    """PGRPO_NPROC=2: the container's command becomes one 2-rank torchrun (gloo here, no GPU); a bad value is
    one sentence and exit 2."""
    env = dict(entrypoint_env(tmp_path, 0), PGRPO_NPROC="two")
    p = subprocess.run(["sh", str(ENTRYPOINT), "train"], cwd=REPO, capture_output=True, text=True, timeout=60, env=env)
    assert p.returncode == 2 and "PGRPO_NPROC must be a positive number" in p.stderr
    env["PGRPO_NPROC"] = "2"
    p = subprocess.run(["sh", str(ENTRYPOINT), "train", "--set", "steps=1", "--set", "data.prompts_per_step=2",
                        "--set", "rollout.max_new_tokens=8", "--set", "checkpoint_every=0"],
                       cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-3000:]
    assert "2 rank(s)" in out and "dist: rank 0/2" in out and "dist: rank 1/2" in out
    run = tmp_path / "runs" / "fast-dev-run-seed0"
    assert [json.loads(ln)["step"] for ln in (run / "metrics.jsonl").read_text().splitlines()] == [1]
