"""A run's life, for real: the lock, --overwrite after start-up checks, honest resume, outputs validated before work,
no tracebacks for user mistakes, no orphan graders. Real `pgrpo` subprocesses, the tiny model, real grader children.
"""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from helpers import free_port
from pgrpo import checkpoint as ckpt
from pgrpo.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FDR = os.path.join(ROOT, "jobs", "fast-dev-run.yaml")
QUICK = ["--set", "rollout.max_new_tokens=8", "--set", "grader_workers=1"]
ENV = dict(os.environ, PYTHONUNBUFFERED="1")


def pgrpo(*args, timeout=180, **kw):
    return subprocess.run([sys.executable, "-m", "pgrpo", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=timeout, env=ENV, **kw)


def spawn(*args):
    return subprocess.Popen([sys.executable, "-m", "pgrpo", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, cwd=ROOT, env=ENV, start_new_session=True)


def read_until(p, pattern, timeout=180):
    rx, lines, deadline = re.compile(pattern), [], time.time() + timeout
    while time.time() < deadline:
        line = p.stdout.readline()
        if not line:
            break
        lines.append(line)
        m = rx.search(line)
        if m:
            return m, lines
    raise AssertionError(f"never saw {pattern!r}:\n" + "".join(lines[-30:]))


def one_sentence(p):
    """A user mistake: exit 2, one line on stderr, no traceback."""
    assert p.returncode == 2, (p.returncode, p.stdout[-2000:], p.stderr[-2000:])
    assert "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
    return p.stderr


def gone(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:   # a zombie whose parent has not reaped it yet is gone for our purpose
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] == "Z"
    except OSError:
        return True


def wait_gone(pids, paths, limit=3.0):
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if all(gone(p) for p in pids) and not any(os.path.exists(x) for x in paths):
            return time.monotonic() - (deadline - limit)
        time.sleep(0.05)
    alive = [p for p in pids if not gone(p)]
    left = [x for x in paths if os.path.exists(x)]
    for p in alive:
        try:
            os.killpg(p, signal.SIGKILL)
        except OSError:
            pass
    raise AssertionError(f"after {limit}s still alive: {alive}, still there: {left}")


def grader_of(pid_line_pid):
    """The local grader's socket dir and its sandbox pids, read from the grader itself."""
    with open(f"/proc/{pid_line_pid}/cmdline", "rb") as f:
        argv = f.read().split(b"\0")
    sock = argv[argv.index(b"--socket") + 1].decode()
    from pgrpo.grader.client import GraderClient
    h = GraderClient(sock, retries=3).health()
    return os.path.dirname(sock), [p for p in h["sandbox_pids"] if p]


@pytest.fixture(scope="module")
def done_run(tmp_path_factory):
    """A finished 2-step run (checkpoints at 1 and 2) to overwrite, resume and corrupt copies of."""
    d = str(tmp_path_factory.mktemp("done") / "run")
    p = pgrpo("train", "--config", FDR, "--out", d, *QUICK, "--set", "steps=2", "--set", "checkpoint_every=1")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return d


def copy_run(src, dst):
    import shutil
    shutil.copytree(src, dst)
    return str(dst)


# ----------------------------------------------------------------------------- the lock

def test_second_trainer_on_a_locked_dir_stops_and_a_dead_holders_lock_is_taken_over(tmp_path):
    d = str(tmp_path / "run")
    a = spawn("train", "--config", FDR, "--out", d, *QUICK, "--set", "steps=200", "--set", "checkpoint_every=1")
    try:
        read_until(a, r"^checkpoint: .*ckpt_000001")
        for argv in (["--config", FDR, "--out", d, "--overwrite"], ["--resume", d]):
            b = pgrpo("train", *argv, *QUICK)
            msg = one_sentence(b)
            assert f"in use by another trainer (pid {a.pid})" in msg, msg
        assert a.poll() is None and ckpt.latest(d)   # the holder runs on, its files untouched
    finally:
        os.killpg(a.pid, signal.SIGKILL)             # the holder dies without any cleanup: the lock is stale
        a.wait()
    time.sleep(0.5)
    from pgrpo.rundir import holder
    assert holder(d) is None
    c = pgrpo("train", "--resume", d, "--set", "steps=2")
    assert c.returncode == 0, c.stdout[-2000:] + c.stderr[-2000:]


def test_sweep_does_not_start_a_run_on_a_locked_dir(tmp_path):
    from pgrpo import sweep
    from pgrpo.rundir import RunLock
    d = tmp_path / "sw" / "vanilla-s0"
    d.mkdir(parents=True)
    lock = RunLock(str(d)).acquire()
    try:
        sw = {"out": str(tmp_path / "sw"), "name": "x", "path": "x", "after_run": [], "runs": {}}
        run = {"name": "vanilla-s0", "arm": "vanilla", "seed": 0, "dir": str(d), "config": FDR, "set": []}
        logs = []
        assert sweep.run_one(sw, run, sweep.State(sw), log=logs.append) is False
        assert f"pid {os.getpid()}" in logs[-1] and "not started" in logs[-1]
        assert "in use by pid" in sweep.State(sw).get("vanilla-s0")["error"]
    finally:
        lock.release()


# ----------------------------------------------------------------------------- --overwrite only after start-up

def _wrong_shape_vhack(path):
    from pgrpo import vhack
    from pgrpo.adapter import SVDAdapter
    from pgrpo.model import load_model
    model, _ = load_model("tiny", "float32", "cpu", seed=0)
    ad = SVDAdapter(model, mode="merged", cache_dir=None)
    V = {n: torch.linalg.qr(torch.randn(r + 3, 2))[0].T.contiguous() for n, r in zip(ad.names, ad.ranks)}
    vhack.save_vhack(path, V, {n: torch.ones(2) for n in V}, {"k": "2"})


def test_overwrite_with_a_failing_start_up_deletes_nothing(done_run, tmp_path):
    d = copy_run(done_run, tmp_path / "run")
    before = sorted(os.listdir(d))
    metrics = open(os.path.join(d, "metrics.jsonl")).read()
    with socket.socket() as busy:
        busy.bind(("0.0.0.0", 0))
        busy.listen()
        port = busy.getsockname()[1]
        msg = one_sentence(pgrpo("train", "--config", FDR, "--out", d, "--overwrite", "--metrics-port", str(port)))
    assert "cannot serve metrics" in msg
    bad = str(tmp_path / "wrong.safetensors")
    _wrong_shape_vhack(bad)
    msg = one_sentence(pgrpo("train", "--config", FDR, "--out", d, "--overwrite", "--set", "arm.name=projected",
                             "--set", f"arm.vhack_path={bad}"))
    assert "does not fit this adapter" in msg
    msg = one_sentence(pgrpo("train", "--config", FDR, "--out", d, "--overwrite", "--set",
                             f"grader_socket={tmp_path}/no/such/dir/g.sock"))
    assert "does not exist" in msg
    assert sorted(os.listdir(d)) == before and open(os.path.join(d, "metrics.jsonl")).read() == metrics
    assert len(os.listdir(os.path.join(d, "rollouts"))) == 2


# ----------------------------------------------------------------------------- honest resume

def test_resume_compares_with_the_checkpoint_not_the_editable_yaml(done_run, tmp_path):
    from pgrpo.train import resolve
    d = copy_run(done_run, tmp_path / "run")
    yml = os.path.join(d, "config.yaml")
    text = open(yml).read()
    open(yml, "w").write(text.replace("lr: 0.01", "lr: 0.5"))
    with pytest.raises(UserError, match=r"config key grpo.lr cannot change when resuming.*says 0\.01, .*config\.yaml "
                                        r"\(edited by hand\) says 0\.5"):
        resolve(["--resume", d])
    os.remove(yml)   # the checkpoint alone is enough to resume
    cfg, _, resume, _ = resolve(["--resume", d, "--set", "steps=3"])
    assert resume and cfg.grpo.lr == 0.01 and cfg.steps == 3
    with pytest.raises(UserError, match="config key seed cannot change when resuming.*--set says 7"):
        resolve(["--resume", d, "--set", "seed=7"])


def test_resume_announces_a_longer_schedule(done_run, tmp_path, capsys):
    from pgrpo.train import resolve
    d = copy_run(done_run, tmp_path / "run")
    resolve(["--resume", d, "--set", "steps=6"])
    assert "resume: steps 2 -> 6 changes the cosine lr schedule's shape" in capsys.readouterr().out


def test_resume_refuses_another_vhack_basis(tmp_path):
    """A run started with a v_hack may find it at a new path (same bytes), never a different file."""
    from pgrpo import vhack
    from pgrpo.train import resolve
    import test_train
    vpath, V = test_train._random_vhack_file(tmp_path)
    d = str(tmp_path / "run")
    p = pgrpo("train", "--config", FDR, "--out", d, *QUICK, "--set", "steps=1", "--set", "arm.name=projected",
              "--set", f"arm.vhack_path={vpath}")
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    moved = str(tmp_path / "moved.safetensors")
    os.rename(vpath, moved)
    cfg, *_ = resolve(["--resume", d, "--set", f"arm.vhack_path={moved}"])   # same sha256: accepted
    assert cfg.arm.vhack_path == moved
    other = str(tmp_path / "other.safetensors")
    vhack.save_vhack(other, {n: -v for n, v in V.items()}, {n: torch.ones(2) for n in V}, {"k": "2"})
    with pytest.raises(UserError, match="arm.vhack_path cannot change the projection basis when resuming"):
        resolve(["--resume", d, "--set", f"arm.vhack_path={other}"])


def test_corrupted_newest_checkpoint_names_the_newest_intact_one(done_run, tmp_path):
    d = copy_run(done_run, tmp_path / "run")
    newest = os.path.join(d, "ckpt_000002.safetensors")
    data = open(newest, "rb").read()
    open(newest, "wb").write(data[: len(data) // 2])
    msg = one_sentence(pgrpo("train", "--resume", d))
    older = os.path.join(d, "ckpt_000001.safetensors")
    assert "corrupted" in msg and f"newest intact checkpoint is {older} (step 1)" in msg, msg
    m = re.search(r"\(mv (\S+) (\S+)\)", msg)
    os.rename(m.group(1), m.group(2))   # do what it says
    p = pgrpo("train", "--resume", d)
    assert p.returncode == 0 and "from step 1" in p.stdout, p.stdout[-2000:] + p.stderr[-2000:]
    assert ckpt.latest(d).endswith("ckpt_000002.safetensors")
    rows = [json.loads(x) for x in open(os.path.join(d, "metrics.jsonl"))]
    assert [r["step"] for r in rows] == [1, 2]
    assert sorted(os.listdir(os.path.join(d, "rollouts"))) == ["step_000001.jsonl.gz", "step_000002.jsonl.gz"]


# ----------------------------------------------------------------------------- outputs validated before work

def _problems_file(tmp_path, n=2):
    from pgrpo.data.problems import builtin_problems, problem_to_row
    path = tmp_path / "problems.jsonl"
    probs = builtin_problems()[:n]
    path.write_text("".join(json.dumps(problem_to_row(p)) + "\n" for p in probs))
    return str(path), probs


UNWRITABLE = "/sys/pgrpo-test"   # /sys is read-only even for root (tests run as root here)


@pytest.mark.parametrize("where", ["missing", "under_file", "unwritable"])
def test_grade_and_extract_check_out_before_work(tmp_path, where):
    probs, ps = _problems_file(tmp_path)
    resp = tmp_path / "r.jsonl"
    resp.write_text(json.dumps({"id": ps[0].id, "response": "```python\nx = 1\n```"}) + "\n")
    (tmp_path / "afile").write_text("x")
    out = {"missing": tmp_path / "no" / "such" / "out.jsonl", "under_file": tmp_path / "afile" / "out.jsonl",
           "unwritable": f"{UNWRITABLE}/out.jsonl"}[where]
    t0 = time.time()
    msg = one_sentence(pgrpo("grade", "--problems", probs, "--responses", str(resp), "--out", str(out)))
    assert time.time() - t0 < 20 and str(out) in msg
    msg = one_sentence(pgrpo("extract", "--config", os.path.join(ROOT, "jobs", "smoke-projected.yaml"), "--out",
                             str(out).replace(".jsonl", ".safetensors")))
    assert "--out" in msg


@pytest.mark.parametrize("where", ["under_file", "unwritable", "is_file"])
def test_train_and_report_check_out_dirs(tmp_path, where):
    (tmp_path / "afile").write_text("x")
    out = {"under_file": tmp_path / "afile" / "run", "unwritable": f"{UNWRITABLE}/run",
           "is_file": tmp_path / "afile"}[where]
    msg = one_sentence(pgrpo("train", "--config", FDR, "--out", str(out)))
    assert "--out" in msg
    msg = one_sentence(pgrpo("report", str(tmp_path), "--out", str(out)))
    assert "--out" in msg


# ----------------------------------------------------------------------------- no tracebacks for user mistakes

def test_non_utf8_inputs_name_file_and_line(tmp_path, done_run):
    probs, ps = _problems_file(tmp_path, n=3)
    lines = open(probs, "rb").read().splitlines(keepends=True)
    bad_probs = tmp_path / "bad_problems.jsonl"
    bad_probs.write_bytes(lines[0] + lines[1][:40] + b"\xff\xfe" + lines[1][40:] + lines[2])
    msg = one_sentence(pgrpo("train", "--config", FDR, "--out", str(tmp_path / "r1"), "--set",
                             f"data.problems={bad_probs}"))
    assert f"{bad_probs}:2: not UTF-8" in msg
    resp = tmp_path / "resp.jsonl"
    resp.write_bytes(json.dumps({"id": ps[0].id, "response": "ok"}).encode() + b"\n"
                     + b'{"id": "x", "response": "caf\xe9"}\n')
    msg = one_sentence(pgrpo("grade", "--problems", probs, "--responses", str(resp)))
    assert f"{resp}:2: not UTF-8" in msg
    pool = tmp_path / "pool.jsonl"
    pool.write_bytes(b'{"id": "a", "completion": "\xc3("}\n')
    msg = one_sentence(pgrpo("train", "--config", FDR, "--out", str(tmp_path / "r2"), "--set",
                             f"teacher.pool={pool}"))
    assert f"{pool}:1: not UTF-8" in msg
    d = copy_run(done_run, tmp_path / "run")
    with open(os.path.join(d, "metrics.jsonl"), "ab") as f:
        f.write(b'{"step": 3, "note": "\x80"}\n')
    msg = one_sentence(pgrpo("report", d, "--out", str(tmp_path / "rep"), "--no-plots"))
    assert "metrics.jsonl:3: not UTF-8" in msg


def test_non_finite_vhack_is_refused_at_load(tmp_path):
    from pgrpo import vhack
    path = str(tmp_path / "nan.safetensors")
    V = {"m": torch.tensor([[1.0, float("nan")]])}
    vhack.save_vhack(path, V, {"m": torch.ones(1)}, {"k": "1"})
    with pytest.raises(UserError, match=f"{re.escape(path)}: v_hack of module m holds non-finite values"):
        vhack.load_vhack(path)


# ----------------------------------------------------------------------------- no orphans

@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM, signal.SIGINT])
def test_trainer_death_leaves_no_grader_and_no_temp_dir(tmp_path, sig):
    d = str(tmp_path / "run")
    p = spawn("train", "--config", FDR, "--out", d, *QUICK, "--set", "steps=200")
    try:
        pid = int(read_until(p, r"^grader: local grader pid (\d+)")[0].group(1))
        tmp, sandboxes = grader_of(pid)
        read_until(p, r"^TIMING step=1 ")
        os.killpg(p.pid, sig) if sig == signal.SIGKILL else p.send_signal(sig)
        rc = p.wait(timeout=30)
        took = wait_gone([pid] + sandboxes, [tmp])
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    assert rc == {signal.SIGKILL: -signal.SIGKILL, signal.SIGTERM: 143, signal.SIGINT: 130}[sig]
    print(f"grader and its temp dir gone {took:.2f}s after the trainer's {signal.Signals(sig).name}")


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM, signal.SIGINT])
def test_grade_death_leaves_no_grader_and_no_temp_dir(tmp_path, sig):
    probs, ps = _problems_file(tmp_path)
    slow = "```python\nimport time\ntime.sleep(30)\n```"
    resp = tmp_path / "r.jsonl"
    resp.write_text("".join(json.dumps({"id": ps[i % 2].id, "response": slow}) + "\n" for i in range(8)))
    p = subprocess.Popen([sys.executable, "-m", "pgrpo", "grade", "--problems", probs, "--responses", str(resp),
                          "--workers", "1", "--time-limit", "20"], cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline, kids = time.time() + 60, []
        while time.time() < deadline and not kids:   # the grader child, once it serves
            out = subprocess.run(["pgrep", "-P", str(p.pid)], capture_output=True, text=True).stdout.split()
            for k in map(int, out):
                try:
                    tmp, sandboxes = grader_of(k)
                    kids = [k] + sandboxes
                except Exception:
                    pass
            time.sleep(0.2)
        assert kids, "the grade command never started its grader"
        time.sleep(1.0)   # grading is under way
        os.kill(p.pid, sig)
        rc = p.wait(timeout=30)
        wait_gone(kids, [tmp])
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    assert rc == {signal.SIGKILL: -9, signal.SIGTERM: 143, signal.SIGINT: 130}[sig]


# ----------------------------------------------------------------------------- the container entrypoint

def test_entrypoint_does_not_restart_a_user_error(tmp_path):
    env = dict(ENV, PATH=f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ.get('PATH', '')}",
               PGRPO_RUNS_DIR=str(tmp_path / "runs"), PGRPO_CACHE_DIR=str(tmp_path / "cache"),
               PGRPO_JOBS_DIR=os.path.join(ROOT, "jobs"), PGRPO_METRICS_PORT=str(free_port()))
    ep = os.path.join(ROOT, "deploy", "entrypoint.sh")
    p = subprocess.run(["sh", ep, "train", "--set", "grpo.lr=-1"], env=env, capture_output=True, text=True,
                       timeout=120, cwd=ROOT)
    assert p.returncode == 0, p.stderr   # on-failure restarts only non-zero exits
    assert "config key grpo.lr" in p.stderr and "not restarting" in p.stderr
    p = subprocess.run(["sh", ep, "train"], env=dict(env, PGRPO_PRESET="no-such-preset"), capture_output=True,
                       text=True, timeout=60, cwd=ROOT)
    assert p.returncode == 0 and "no preset" in p.stderr and "not restarting" in p.stderr


# ----------------------------------------------------------------------------- help texts people rely on

def test_help_texts():
    p = pgrpo("bench", "--help")
    assert p.returncode == 0 and "kernel" in p.stdout and "grader" in p.stdout and "step" in p.stdout
    p = pgrpo("grade", "--help")
    assert p.returncode == 0 and "default: none" in p.stdout and "default 5" in p.stdout
    p = pgrpo("--help")
    for cmd in ("rollouts", "export", "eval"):
        assert f"  {cmd} " in p.stdout
