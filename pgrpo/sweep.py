"""`pgrpo sweep --config jobs/sweep-full.yaml [--dry-run]` and `pgrpo sweep status --config ...`.

The preregistered comparison as one command: extract v_hack once, then seeds x arms training runs, each a
subprocess `python -m pgrpo train ...` with its own run directory. Why this shape:
- one subprocess per run: a crash, OOM or SIGKILL takes down one run, never the sweep; the rest continue;
- every run is resumable: a run dir with a checkpoint is continued with `--resume`, a finished run
  (its metrics reach the configured steps, or the sweep recorded it done) is skipped, so re-running the
  same command after any interruption finishes exactly what is left;
- runs are ordered seed-major (vanilla s0, projected s0, vanilla s1, ...) so a sweep stopped half-way
  still holds matched pairs for the report;
- GPUs: with `gpus: []` runs go one at a time on whatever device the trainer picks; with `gpus: [0, 1]`
  one run per listed GPU at a time, pinned with CUDA_VISIBLE_DEVICES; with GPU sets, `gpus: [[0,1,2,3],[4,5,6,7]]`,
  one run per set at a time, each a `torchrun --standalone --nproc_per_node 4 --max-restarts 0` over its set
  (data parallel, pgrpo/dist.py), so a run of the sweep uses 4 GPUs and two runs go side by side.
State lives in the run dirs plus `<out>/sweep-state.json` (written temp + rename), which `status` reads.

Sweep YAML (all keys; see jobs/sweep-full.yaml):
    name: sweep-full            # sweep name (default: the file's stem)
    out: runs/sweep-full        # sweep root; run dirs are <out>/<arm>-s<seed>
    seeds: [0, 1, 2]
    set: []                     # --set overrides for every run
    gpus: []                    # [] = sequential; list of GPU ids = one run per GPU; list of GPU sets
                                # ([[0,1],[2,3]]) = one torchrun per set, as many ranks as GPUs in it
    parallel: 1                 # without gpus: this many CPU runs at a time (each should set cpu_threads: 1)
    extract:                    # omit (or null) when no arm needs v_hack
      config: jobs/full-projected.yaml
      out: vhack.safetensors    # relative to <out> unless absolute
      set: []                   # --set overrides for `pgrpo extract`
      args: []                  # extra `pgrpo extract` flags, e.g. ["--pairs", "pairs.json", "--k", "2"]
      per_seed: false           # true: one v_hack per seed (extracted with --set seed=S), for base models
                                # that depend on the seed (the embedded tiny model)
    arms:
      vanilla:   {config: jobs/full-vanilla.yaml, set: [], vhack: true}
      projected: {config: jobs/full-projected.yaml, set: [], vhack: true}
    prepare: []                 # optional commands (argv lists) run once per invocation before extraction;
                                # they must be idempotent, e.g. [["{python}", "-m", "pgrpo.substrate", "build", ...]]
    after_run: []               # optional command run after each finished run, e.g.
                                # ["{python}", "-m", "pgrpo.substrate", "heldout", "{run}"]
    metrics_port_base: 0        # > 0: each running run serves /metrics on its own port (the lowest free one
                                # >= this base), listed in <out>/prometheus-targets.json, a Prometheus
                                # file-based service discovery file (one target per running run); 0 = off
    metrics_host: localhost     # host name Prometheus reaches the runs at (written into the targets)
    metrics_targets: null       # the targets file (default <out>/prometheus-targets.json; compose's Prometheus
                                # reads /runs/prometheus-targets/*.json)
`vhack: true` passes `--set arm.vhack_path=<extracted file>` (vanilla then logs what projection would have
removed without applying it).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

from pgrpo.errors import UserError

STATE_FILE = "sweep-state.json"
DONE_FILE = "SWEEP_DONE"        # written into a run dir once its training (and after_run) succeeded
SWEEP_KEYS = {"name", "out", "seeds", "set", "gpus", "parallel", "prepare", "extract", "arms", "after_run",
              "metrics_port_base", "metrics_host", "metrics_targets"}
TARGETS_FILE = "prometheus-targets.json"
ARM_KEYS = {"config", "set", "vhack"}
EXTRACT_KEYS = {"config", "out", "set", "args", "per_seed"}


# ----------------------------------------------------------------------------------------- config
def _strlist(v, key):
    if v is None:
        return []
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise UserError(f"sweep key {key} must be a list of strings, got {v!r}")
    return list(v)


def load_sweep(path):
    """Read and validate the sweep YAML; every mistake names its key. Paths are kept as written (relative
    to the working directory, like `pgrpo train --config`)."""
    from pgrpo.config import load_yaml_mapping
    d = load_yaml_mapping(path, "sweep config")
    for k in d:
        if k not in SWEEP_KEYS:
            raise UserError(f"unknown sweep key {k} (known: {', '.join(sorted(SWEEP_KEYS))})")
    name = d.get("name") or os.path.splitext(os.path.basename(path))[0]
    out = d.get("out") or os.path.join("runs", name)
    if not isinstance(out, str):
        raise UserError("sweep key out must be a directory path")
    seeds = d.get("seeds", [0, 1, 2])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool)
                                                             for s in seeds):
        raise UserError(f"sweep key seeds must be a non-empty list of integers, got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise UserError(f"sweep key seeds lists a seed twice: {seeds}")
    gpus = d.get("gpus") or []

    def gpu_id(g):
        return isinstance(g, (int, str)) and not isinstance(g, bool) and str(g).strip() != ""
    if not isinstance(gpus, list) or not all(gpu_id(g) or (isinstance(g, list) and g and all(map(gpu_id, g)))
                                             for g in gpus):
        raise UserError(f"sweep key gpus must be a list of GPU ids ([0, 1]) or of non-empty GPU sets "
                        f"([[0, 1], [2, 3]]), got {gpus!r}")
    flat = [str(x) for g in gpus for x in (g if isinstance(g, list) else [g])]
    if len(set(flat)) != len(flat):
        raise UserError(f"sweep key gpus lists a GPU twice: {gpus}")
    gpus = [",".join(str(x) for x in g) if isinstance(g, list) else g for g in gpus]   # a slot: "0" or "0,1,2,3"
    parallel = d.get("parallel", 1)
    if not isinstance(parallel, int) or isinstance(parallel, bool) or parallel < 1:
        raise UserError(f"sweep key parallel must be an integer >= 1, got {parallel!r}")
    if parallel > 1 and gpus:
        raise UserError("sweep keys gpus and parallel exclude each other (with gpus, one run per GPU runs at a time)")
    arms = d.get("arms")
    if not isinstance(arms, dict) or not arms:
        raise UserError("sweep key arms must map arm names to {config: preset.yaml, ...}")
    norm_arms = {}
    for arm, a in arms.items():
        if not isinstance(a, dict) or not isinstance(a.get("config"), str):
            raise UserError(f"sweep key arms.{arm}.config must name a preset YAML")
        for k in a:
            if k not in ARM_KEYS:
                raise UserError(f"unknown sweep key arms.{arm}.{k} (known: {', '.join(sorted(ARM_KEYS))})")
        if not os.path.isfile(a["config"]):
            raise UserError(f"sweep key arms.{arm}.config points at {a['config']}, which does not exist")
        vh = a.get("vhack", False)
        if not isinstance(vh, bool):
            raise UserError(f"sweep key arms.{arm}.vhack must be true or false")
        norm_arms[str(arm)] = {"config": a["config"], "set": _strlist(a.get("set"), f"arms.{arm}.set"), "vhack": vh}
    ex = d.get("extract")
    if ex is not None:
        if not isinstance(ex, dict) or not isinstance(ex.get("config"), str):
            raise UserError("sweep key extract.config must name the preset `pgrpo extract` reads")
        for k in ex:
            if k not in EXTRACT_KEYS:
                raise UserError(f"unknown sweep key extract.{k} (known: {', '.join(sorted(EXTRACT_KEYS))})")
        if not os.path.isfile(ex["config"]):
            raise UserError(f"sweep key extract.config points at {ex['config']}, which does not exist")
        eout = ex.get("out") or "vhack.safetensors"
        per_seed = ex.get("per_seed", False)
        if not isinstance(per_seed, bool):
            raise UserError("sweep key extract.per_seed must be true or false")
        if per_seed and "{seed}" not in eout:
            stem, ext = os.path.splitext(eout)
            eout = f"{stem}-s{{seed}}{ext}"
        ex = {"config": ex["config"], "set": _strlist(ex.get("set"), "extract.set"),
              "args": _strlist(ex.get("args"), "extract.args"), "per_seed": per_seed,
              "out": eout if os.path.isabs(eout) else os.path.join(out, eout)}
    if any(a["vhack"] for a in norm_arms.values()) and ex is None:
        raise UserError("an arm has vhack: true but the sweep has no extract section to make v_hack")
    prepare = d.get("prepare") or []
    if not isinstance(prepare, list):
        raise UserError("sweep key prepare must be a list of commands (each a list of strings)")
    prepare = [_strlist(c, f"prepare[{i}]") for i, c in enumerate(prepare)]
    if any(not c for c in prepare):
        raise UserError("sweep key prepare holds an empty command")
    port_base = d.get("metrics_port_base", 0)
    if isinstance(port_base, bool) or not isinstance(port_base, int) or not (port_base == 0 or 1024 <= port_base <= 65000):
        raise UserError(f"sweep key metrics_port_base must be 0 (off) or a port in [1024, 65000], got {port_base!r}")
    host = d.get("metrics_host", "localhost")
    if not isinstance(host, str) or not host or ":" in host:
        raise UserError(f"sweep key metrics_host must be a host name without a port, got {host!r}")
    targets = d.get("metrics_targets") or os.path.join(out, TARGETS_FILE)
    if not isinstance(targets, str):
        raise UserError(f"sweep key metrics_targets must be a file path, got {targets!r}")
    return {"path": path, "name": str(name), "out": out, "seeds": seeds, "gpus": [str(g) for g in gpus],
            "metrics_port_base": port_base, "metrics_host": host, "metrics_targets": targets,
            "parallel": parallel,
            "prepare": prepare,
            "set": _strlist(d.get("set"), "set"), "arms": norm_arms, "extract": ex,
            "after_run": _strlist(d.get("after_run"), "after_run")}


def vhack_path(sw, seed):
    """Where v_hack for `seed` lives: one file, or one per seed when the base model depends on the seed
    (the embedded tiny model is initialised from the run seed, so its SVD bases differ per seed)."""
    return sw["extract"]["out"].replace("{seed}", str(seed))


def extract_jobs(sw):
    """[(seed or None, out path, argv)] for the extraction(s) the sweep needs."""
    ex = sw["extract"]
    if ex is None:
        return []
    seeds = sw["seeds"] if ex["per_seed"] else [None]
    jobs = []
    for seed in seeds:
        out = vhack_path(sw, seed if seed is not None else sw["seeds"][0])
        argv = [sys.executable, "-m", "pgrpo", "extract", "--config", ex["config"], "--out", out] + ex["args"]
        for s in ex["set"] + ([f"seed={seed}"] if seed is not None else []):
            argv += ["--set", s]
        jobs.append((seed, out, argv))
    return jobs


def plan(sw):
    """The runs of the sweep, seed-major, each with its run dir and full `pgrpo train` argv tail."""
    runs = []
    for seed in sw["seeds"]:
        for arm, a in sw["arms"].items():
            name = f"{arm}-s{seed}"
            sets = list(sw["set"]) + list(a["set"]) + [f"seed={seed}"]
            if a["vhack"]:
                sets.append(f"arm.vhack_path={vhack_path(sw, seed)}")
            runs.append({"name": name, "arm": arm, "seed": seed, "dir": os.path.join(sw["out"], name),
                         "config": a["config"], "set": sets})
    return runs


# ----------------------------------------------------------------------------------------- run-dir state
def planned_steps(run):
    """Steps the run is configured for, from the resolved preset + overrides (the trainer's own loader)."""
    from pgrpo import config as C
    return C.load(run["config"], run["set"], check_files=False).steps


def logged_steps(run_dir):
    """Distinct steps in metrics.jsonl (a torn last line from a kill is ignored)."""
    steps = set()
    try:
        with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8", errors="replace") as f:
            for line in f:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(row, dict) and isinstance(row.get("step"), int) and row.get("kind", "train") == "train":
                    steps.add(row["step"])
    except FileNotFoundError:
        pass
    return steps


_CKPT = re.compile(r"ckpt_(\d+)\.safetensors$")


def checkpoint_step(run_dir):
    """Step of the newest checkpoint (the trainer's ckpt_NNNNNN.safetensors), or None."""
    steps = [int(m.group(1)) for m in (_CKPT.search(os.path.basename(p))
                                      for p in glob.glob(os.path.join(run_dir, "ckpt_*.safetensors"))) if m]
    return max(steps) if steps else None


def has_checkpoint(run_dir):
    return checkpoint_step(run_dir) is not None


def is_finished(run, steps=None, need_marker=False):
    """Finished = the sweep marked it done, or the trainer wrote its final checkpoint (ckpt at step `steps`;
    the trainer always checkpoints the last step). Metrics alone do not count: a run killed between logging
    its last step and saving the final checkpoint is resumed, which redoes that step. With an after_run hook
    (need_marker) only the sweep's marker counts, so a failed hook is retried (the trainer's --resume of a
    complete run is a no-op)."""
    if os.path.isfile(os.path.join(run["dir"], DONE_FILE)):
        return True
    if need_marker:
        return False
    steps = planned_steps(run) if steps is None else steps
    last = checkpoint_step(run["dir"])
    return last is not None and last >= steps


def _pid_alive(pid):
    """True if `pid` is a live process that is one of ours (a recycled pid of another program is not)."""
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, TypeError, OverflowError):
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read()
        return b"pgrpo" in cmd or os.fsencode(sys.executable) in cmd
    except OSError:
        return True


class State:
    """<out>/sweep-state.json: one record per run (+ the extraction), rewritten atomically on each change."""

    def __init__(self, sw):
        self.path = os.path.join(sw["out"], STATE_FILE)
        self.lock = threading.Lock()
        self.d = {"sweep": sw["name"], "config": sw["path"], "runs": {}, "extract": {}}
        if os.path.isfile(self.path):
            try:
                with open(self.path, encoding="utf-8") as f:
                    old = json.load(f)
                if isinstance(old, dict):
                    self.d.update({k: old[k] for k in ("runs", "extract") if isinstance(old.get(k), dict)})
            except (json.JSONDecodeError, OSError):
                pass  # a state file is a cache of what the run dirs say; rebuild it

    def set(self, key, **fields):
        with self.lock:
            if key.startswith("extract"):
                self.d["extract"][key] = {**self.d["extract"].get(key, {}), **fields}
            else:
                self.d["runs"][key] = {**self.d["runs"].get(key, {}), **fields}
            self.d["updated"] = time.time()
            os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
            tmp = f"{self.path}.tmp-{os.getpid()}-{threading.get_ident()}"
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(self.d, f, indent=1)
            os.replace(tmp, self.path)

    def get(self, key):
        return (self.d["extract"] if key.startswith("extract") else self.d["runs"]).get(key) or {}


# ----------------------------------------------------------------------------------------- Prometheus targets
class Targets:
    """<out>/prometheus-targets.json: one file_sd target per running run. Ports: the lowest port >= the base that
    no other running run of this sweep holds and that nothing else on this host listens on (checked by binding
    it), taken under a lock, so concurrent runs never collide. Rewritten atomically on every change; Prometheus
    re-reads it by itself (file_sd_configs). Target labels `sweep`, `sweep_run` only: the metrics carry their
    own run/arm/seed labels, which a target label of the same name would rename."""

    def __init__(self, sw):
        self.path = sw.get("metrics_targets") or os.path.join(sw["out"], TARGETS_FILE)
        self.base, self.host, self.sweep = sw.get("metrics_port_base", 0), sw.get("metrics_host", "localhost"), sw["name"]
        self.lock = threading.Lock()
        self.ports = {}   # run name -> port
        if self.base:
            self._write()   # a sweep killed hard may have left targets of runs that are gone

    def _free(self, port):
        import socket
        with socket.socket() as s:
            try:
                s.bind(("0.0.0.0", port))
                return True
            except OSError:
                return False

    def take(self, name):
        if not self.base:
            return None
        with self.lock:
            port = self.base
            while port in self.ports.values() or not self._free(port):
                port += 1
            self.ports[name] = port
            self._write()
            return port

    def drop(self, name):
        if not self.base:
            return
        with self.lock:
            self.ports.pop(name, None)
            self._write()

    def _write(self):
        groups = [{"targets": [f"{self.host}:{port}"], "labels": {"sweep": self.sweep, "sweep_run": name}}
                  for name, port in sorted(self.ports.items())]
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        tmp = f"{self.path}.tmp-{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(groups, f, indent=1)
        os.replace(tmp, self.path)


# ----------------------------------------------------------------------------------------- running
_children = set()
_children_lock = threading.Lock()


def _tail(path, n=3):
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = [ln.rstrip() for ln in f.readlines()[-200:] if ln.strip()]
    except OSError:
        return ""
    return " | ".join(lines[-n:])


def _spawn(argv, log_path, env=None, on_start=None):
    """Run one child with stdout+stderr to log_path (appended, so a resumed run keeps its history)."""
    os.makedirs(os.path.dirname(log_path) or ".", exist_ok=True)
    with open(log_path, "a", encoding="utf-8") as log:
        log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(argv)}\n")
        log.flush()
        p = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        with _children_lock:
            _children.add(p)
        try:
            if on_start:
                on_start(p)
            return p.wait()
        finally:
            with _children_lock:
                _children.discard(p)


def _kill_children():
    with _children_lock:
        kids = list(_children)
    for p in kids:
        try:
            os.killpg(p.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    for p in kids:
        try:
            p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def launcher(nproc=1):
    """`python -m pgrpo` for one process; torchrun (standalone: its own free rendezvous port, so several
    runs can share a host; --max-restarts 0: a failed rank stops the run, the sweep resumes it) for N ranks."""
    if nproc <= 1:
        return [sys.executable, "-m", "pgrpo"]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
            "--max-restarts", "0", "-m", "pgrpo"]


def train_argv(run, nproc=1):
    """A fresh run gets its preset + overrides; a run with a checkpoint is continued with `--resume RUN_DIR`,
    which reuses the resolved config.yaml the trainer saved there (so the overrides are not repeated).
    nproc > 1: one torchrun over that many ranks (a GPU set)."""
    if has_checkpoint(run["dir"]):
        return launcher(nproc) + ["train", "--resume", run["dir"]]
    argv = launcher(nproc) + ["train", "--config", run["config"], "--out", run["dir"]]
    for s in run["set"]:
        argv += ["--set", s]
    return argv


def _subst(argv):
    return [a.replace("{python}", sys.executable) for a in argv]


def prepare(sw, state, dry_run=False, log=print):
    """Run the sweep's prepare commands in order; False (and the rest skipped) when one fails."""
    for i, cmd in enumerate(sw["prepare"]):
        argv = _subst(cmd)
        if dry_run:
            log("would run: " + " ".join(argv))
            continue
        logp = os.path.join(sw["out"], "prepare.log")
        log(f"prepare: {' '.join(argv)}")
        rc = _spawn(argv, logp)
        if rc != 0:
            log(f"prepare: FAILED (rc={rc}): {_tail(logp)}")
            state.set("extract-prepare", status="failed", rc=rc, error=_tail(logp))
            return False
    return True


def after_argv(sw, run):
    return [a.replace("{python}", sys.executable).replace("{run}", run["dir"]).replace("{seed}", str(run["seed"]))
            .replace("{arm}", run["arm"]) for a in sw["after_run"]]


def extract(sw, state, seeds=None, dry_run=False, log=print):
    """Make v_hack once (or once per seed in `seeds`); returns the set of seeds (None = all) it is ready for."""
    ready = set()
    for seed, out, argv in extract_jobs(sw):
        if seeds is not None and seed is not None and seed not in seeds:
            continue
        key = "extract" if seed is None else f"extract-s{seed}"
        if os.path.isfile(out):
            log(f"{key}: {out} exists, skipped")
            if state is not None and state.get(key).get("status") != "done":
                state.set(key, status="done", out=out)
            ready.add(seed)
            continue
        if dry_run:
            log("would run: " + " ".join(argv))
            continue
        log(f"{key}: {' '.join(argv[2:])}")
        os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
        logp = os.path.join(sw["out"], f"{key}.log")
        t0 = time.time()
        state.set(key, status="running", started=t0, log=logp, out=out)
        rc = _spawn(argv, logp, on_start=lambda p: state.set(key, pid=p.pid))
        ok = rc == 0 and os.path.isfile(out)
        state.set(key, status="done" if ok else "failed", rc=rc, ended=time.time(),
                  error=None if ok else _tail(logp))
        log(f"{key}: {'done' if ok else f'FAILED (rc={rc}): ' + _tail(logp)} in {time.time() - t0:.0f}s")
        if ok:
            ready.add(seed)
    return ready


def run_one(sw, run, state, gpu=None, log=print, targets=None):
    """Train (or resume) one run, then its after_run hook; the outcome goes to the state file."""
    from pgrpo.rundir import holder
    pid = holder(run["dir"])
    if pid is not None:   # another trainer (another sweep, or by hand) owns the dir: never run two on it
        state.set(run["name"], status="failed", arm=run["arm"], seed=run["seed"], dir=run["dir"], rc=None,
                  error=f"run directory in use by pid {pid}")
        log(f"{run['name']}: run directory {run['dir']} is in use by another trainer (pid {pid}); not started")
        return False
    nproc = len(gpu.split(",")) if gpu is not None else 1
    argv = train_argv(run, nproc)
    port = targets.take(run["name"]) if targets is not None else None
    if port is not None:
        argv += ["--metrics-port", str(port)]
    env = dict(os.environ)
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpu
    logp = os.path.join(run["dir"], "sweep.log")
    attempts = state.get(run["name"]).get("attempts", 0) + 1
    resumed = "--resume" in argv
    where = "" if gpu is None else (f" on GPU {gpu}" if nproc == 1 else f" on GPUs {gpu} ({nproc} ranks)")
    log(f"{run['name']}: {'resume' if resumed else 'start'}{where}")
    t0 = time.time()
    state.set(run["name"], status="running", arm=run["arm"], seed=run["seed"], dir=run["dir"], gpu=gpu,
              attempts=attempts, started=t0, log=logp, rc=None, error=None, resumed=resumed)
    try:
        rc = _spawn(argv, logp, env=env, on_start=lambda p: state.set(run["name"], pid=p.pid, metrics_port=port))
    finally:
        if targets is not None:
            targets.drop(run["name"])
    if rc == 0 and sw["after_run"]:
        rc = _spawn(after_argv(sw, run), logp, env=env, on_start=lambda p: state.set(run["name"], pid=p.pid))
        stage = "after_run"
    else:
        stage = "train"
    dt = time.time() - t0
    if rc == 0:
        _touch(os.path.join(run["dir"], DONE_FILE))
        state.set(run["name"], status="done", rc=0, ended=time.time(), pid=None)
        log(f"{run['name']}: done in {dt:.0f}s")
        return True
    err = _tail(logp)
    state.set(run["name"], status="failed", rc=rc, ended=time.time(), pid=None, error=f"{stage}: {err}")
    log(f"{run['name']}: FAILED ({stage}, rc={rc}) after {dt:.0f}s: {err}")
    return False


def _touch(path):
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(time.strftime("%Y-%m-%dT%H:%M:%S\n"))
    os.replace(tmp, path)


def _on_term(signum, frame):
    """SIGTERM (e.g. from a batch scheduler) stops the sweep like Ctrl-C: children are stopped, state saved."""
    from pgrpo.errors import Terminated
    raise Terminated()


def run_sweep(sw, dry_run=False, log=print):
    """Extract, then every unfinished run; returns the number of runs that failed (0 = all done)."""
    runs = plan(sw)
    state = State(sw) if not dry_run else None
    todo = []
    for run in runs:
        if is_finished(run, need_marker=bool(sw["after_run"])):
            log(f"{run['name']}: finished, skipped")
            if state and state.get(run["name"]).get("status") != "done":
                state.set(run["name"], status="done", arm=run["arm"], seed=run["seed"], dir=run["dir"])
            continue
        rec = state.get(run["name"]) if state else {}
        if rec.get("status") == "running" and _pid_alive(rec.get("pid")):
            # A sweep killed hard leaves its children running (own session); never start a run twice.
            log(f"{run['name']}: still running as pid {rec['pid']} from an earlier sweep; not started again")
            continue
        todo.append(run)
    if dry_run:
        prepare(sw, None, dry_run=True, log=log)
        extract(sw, None, dry_run=True, log=log)
        for run in todo:
            log("would run: " + " ".join(train_argv(run, len(sw["gpus"][0].split(",")) if sw["gpus"] else 1)))
            if sw["after_run"]:
                log("     then: " + " ".join(after_argv(sw, run)))
        return 0
    if not todo:
        log("sweep: nothing left to run")
        return 0
    if not prepare(sw, state, log=log):
        for run in todo:
            state.set(run["name"], status="failed", arm=run["arm"], seed=run["seed"], dir=run["dir"], rc=None,
                      error="a prepare command failed (see prepare.log)")
        log(f"sweep: prepare failed; {len(todo)} runs not started")
        return len(todo)
    need = {r["seed"] for r in todo if sw["arms"][r["arm"]]["vhack"]}
    have = extract(sw, state, seeds=need, log=log) if need else set()
    failed = []
    ready = []
    for run in todo:
        if sw["arms"][run["arm"]]["vhack"] and None not in have and run["seed"] not in have:
            state.set(run["name"], status="failed", arm=run["arm"], seed=run["seed"], dir=run["dir"], rc=None,
                      error="v_hack extraction failed (see the sweep's extract log)")
            failed.append(run["name"])
        else:
            ready.append(run)

    slots = sw["gpus"] or [None] * sw.get("parallel", 1)
    targets = Targets(sw)
    queue = list(ready)
    qlock = threading.Lock()

    def worker(gpu):
        while True:
            with qlock:
                if not queue:
                    return
                run = queue.pop(0)
            if not run_one(sw, run, state, gpu=gpu, log=log, targets=targets):
                with qlock:
                    failed.append(run["name"])

    prev = signal.getsignal(signal.SIGTERM)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_term)
    try:
        if len(slots) == 1:
            worker(slots[0])
        else:
            threads = [threading.Thread(target=worker, args=(g,), daemon=True) for g in slots]
            for t in threads:
                t.start()
            while any(t.is_alive() for t in threads):
                time.sleep(0.5)
    except KeyboardInterrupt:
        log("sweep: interrupted; stopping the running run(s); rerun the same command to resume")
        with qlock:
            queue.clear()
        _kill_children()
        for name, rec in state.d["runs"].items():
            if rec.get("status") == "running":
                state.set(name, status="interrupted", pid=None, ended=time.time())
        raise
    finally:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, prev)
    n_done = sum(1 for r in runs if is_finished(r, need_marker=bool(sw["after_run"])))
    log(f"sweep: {n_done}/{len(runs)} runs finished, {len(failed)} failed"
        + (f" ({', '.join(failed)}); rerun the same command to retry/resume them" if failed else ""))
    return len(failed)


# ----------------------------------------------------------------------------------------- status
def status_rows(sw):
    """One row per planned run: name, arm, seed, status, steps logged/planned, checkpoint, note."""
    state = State(sw)
    rows = []
    for run in plan(sw):
        rec = state.get(run["name"])
        try:
            steps = planned_steps(run)
        except UserError:
            steps = None
        logged = logged_steps(run["dir"])
        ck = checkpoint_step(run["dir"])
        finished = os.path.isfile(os.path.join(run["dir"], DONE_FILE)) or (
            not sw["after_run"] and steps is not None and ck is not None and ck >= steps)
        st = rec.get("status")
        if finished:
            status = "done"
        elif st == "running" and _pid_alive(rec.get("pid")):
            status = "running"
        elif st == "failed":
            status = "failed"
        elif st in ("running", "interrupted") or logged:
            status = "interrupted"
        else:
            status = "pending"
        note = ""
        if status != "done" and status != "running" and (logged or st):
            note = "resumes from checkpoint" if has_checkpoint(run["dir"]) else "restarts from step 0"
        if status == "failed":
            note = f"rc={rec.get('rc')}, {note}: {rec.get('error') or ''}"
        rows.append({"name": run["name"], "arm": run["arm"], "seed": run["seed"], "status": status,
                     "steps": len(logged), "planned": steps, "checkpoint": has_checkpoint(run["dir"]),
                     "attempts": rec.get("attempts", 0), "note": note, "dir": run["dir"]})
    return rows, state.d["extract"]


def format_status(sw):
    rows, ex = status_rows(sw)
    lines = [f"sweep {sw['name']} ({sw['path']}) -> {sw['out']}"]
    for seed, out, _ in extract_jobs(sw):
        key = "extract" if seed is None else f"extract-s{seed}"
        rec = ex.get(key, {})
        st = "done" if os.path.isfile(out) else (rec.get("status") or "pending")
        if st == "running" and not _pid_alive(rec.get("pid")):
            st = "interrupted"
        lines.append(f"{key}: {st}  {out}" + (f"  ({rec.get('error')})" if st == "failed" else ""))
    w = max(len(r["name"]) for r in rows)
    lines.append(f"{'run':<{w}}  {'status':<11}  {'steps':>9}  tries  note")
    for r in rows:
        steps = f"{r['steps']}/{r['planned'] if r['planned'] is not None else '?'}"
        lines.append(f"{r['name']:<{w}}  {r['status']:<11}  {steps:>9}  {r['attempts']:>5}  {r['note']}".rstrip())
    counts = {}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    order = ("done", "running", "failed", "interrupted", "pending")
    lines.append("total: " + ", ".join(f"{counts[k]} {k}" for k in order if k in counts)
                 + f" of {len(rows)}" + ("" if counts.get("done", 0) == len(rows) else
                                         f"; left: {len(rows) - counts.get('done', 0)}"))
    return "\n".join(lines)


def cli(argv):
    argv = list(argv)
    sub = "run"
    for i, a in enumerate(argv):  # `pgrpo sweep status --config X` or `pgrpo sweep --config X status`
        if a in ("status", "run") and (i == 0 or argv[i - 1] != "--config"):
            sub = argv.pop(i)
            break
    ap = argparse.ArgumentParser(prog=f"pgrpo sweep{' status' if sub == 'status' else ''}",
                                 description="Run (or show the state of) a seeds x arms sweep.")
    ap.add_argument("--config", required=True, help="sweep YAML, e.g. jobs/sweep-full.yaml")
    if sub == "run":
        ap.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    a = ap.parse_args(argv)
    sw = load_sweep(a.config)
    if sub == "status":
        print(format_status(sw))
        return 0
    from pgrpo.errors import Terminated
    try:
        failed = run_sweep(sw, dry_run=a.dry_run)
    except Terminated:
        return 143
    except KeyboardInterrupt:
        return 130
    return 1 if failed else 0
