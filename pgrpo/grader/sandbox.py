"""Host side of the sandbox: one persistent, sandboxed zygote interpreter per grading worker.

Why a zygote: starting `python` costs ~15-25 ms plus the setup-code imports, more than most responses take
to test. The zygote (harness.py) starts once inside bubblewrap, imports the usual modules, and per job
forks a pristine runner that starts the job (in namespaces of its own where the kernel allows); the child
gets rlimits, a private working dir, Landlock and a seccomp filter; the runner enforces the wall limit and
the job's aggregate CPU and memory, and nothing of the job outlives it (see harness.py). Cost: a few ms per
job instead of a ~20-80 ms interpreter start.

Layers (outermost first):
- bubblewrap when `bwrap` works here: new user/pid/net/ipc/uts/cgroup namespaces (no network), read-only
  /usr (+ the interpreter prefix) with every site-/dist-packages dir hidden, nothing else of the host
  filesystem (no repo, no /root, no problem files with answers), a size-capped private tmpfs /tmp,
  `--die-with-parent`, `--new-session`. (Nested user namespaces stay possible for the zygote's per-job
  namespaces; jobs themselves cannot create any: the seccomp filter refuses unshare/clone flags/clone3.)
- when the grader runs as root: the sandbox drops to its own uid per worker (so RLIMIT_NPROC is enforced,
  it cannot touch root-owned files, and a sweep `kill(-1)` only reaches the sandbox's own processes).
- per job, in the zygote: fresh user/pid/ipc/mount/uts (+net without bwrap) namespaces, a read-only view of
  every mount and a fresh tmpfs job dir; or, where user namespaces are refused (Docker's default profile),
  the flat mode (harness.py docstring).
- in each job child: rlimits (CPU, address space, file size, processes, open files), Landlock (read only the
  interpreter's files and the job dir, write only the job dir, no TCP, no signals or abstract sockets out of
  the job) and a seccomp filter (no signals/ptrace to anyone, no Unix sockets, no SysV IPC, keys, message
  queues, memfds, namespaces, file metadata changes or locks).
Where those cannot isolate jobs the sandbox refuses to start (`IsolationError`), unless the environment says
PGRPO_SANDBOX_ALLOW_WEAK=1: reads need bwrap or Landlock; without per-job namespaces, seccomp and Landlock
are both needed. Without bwrap and without a uid drop this process makes itself non-dumpable (its /proc
mem/fd/environ are then closed to the jobs, which share its uid).
"""
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from pgrpo.grader import frame

HARNESS_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "harness.py")
PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # .../pgrpo: carries the problem data
MAX_REPLY = 128 << 20   # the runner caps what it sends: 8.25 MB of result lines (x6 when JSON-escaped) + stdout


class SandboxError(Exception):
    """The zygote died, hung or answered garbage; the worker replaces it."""


class IsolationError(SandboxError):
    """The layers this kernel/container allows cannot keep jobs apart: the sandbox refuses to start."""


def _world_executable(path):
    """True if an unprivileged uid can run `path` (every parent dir o+x, the file o+x)."""
    path = os.path.realpath(path)
    parts = path.split(os.sep)
    for i in range(2, len(parts)):
        d = os.sep.join(parts[:i]) or os.sep
        try:
            if not os.stat(d).st_mode & 0o001:
                return False
        except OSError:
            return False
    try:
        return bool(os.stat(path).st_mode & 0o001)
    except OSError:
        return False


def drop_privileges_wanted():
    return os.geteuid() == 0 and os.environ.get("PGRPO_SANDBOX_KEEP_ROOT") != "1"


def sandbox_python(drop_privs):
    """The interpreter the sandbox runs: PGRPO_SANDBOX_PYTHON, else this interpreter, else a system
    python3 an unprivileged uid can execute (a pyenv python under /root is not reachable after the drop)."""
    env = os.environ.get("PGRPO_SANDBOX_PYTHON")
    if env:
        return env
    candidates = [os.path.realpath(getattr(sys, "_base_executable", sys.executable)),
                  os.path.realpath(sys.executable)]
    for name in ("python3.11", "python3"):
        p = shutil.which(name, path="/usr/local/bin:/usr/bin:/bin")
        if p:
            candidates.append(os.path.realpath(p))
    if not drop_privs:
        return candidates[0]
    for c in candidates:
        if _world_executable(c):
            return c
    return None


_BWRAP_OK = {}


def bwrap_works(python, drop_uid):
    """Probe once per (python, uid): bwrap may exist but be unusable (no user namespaces)."""
    key = (python, drop_uid is not None)
    if key not in _BWRAP_OK:
        ok = False
        if shutil.which("bwrap"):
            argv = bwrap_argv(python, 1 << 20, os.geteuid() == 0 and drop_uid is None) + \
                [python, "-I", "-S", "-c", "pass"]
            try:
                r = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=20,
                                   preexec_fn=_dropper(drop_uid) if drop_uid is not None else None)
                ok = r.returncode == 0
            except (OSError, subprocess.TimeoutExpired):
                ok = False
        _BWRAP_OK[key] = ok
    return _BWRAP_OK[key]


def package_dirs(python):
    """site-/dist-packages dirs of `python` that exist: where a pip-installed pgrpo (and its problem data)
    would be. bwrap hides them; Landlock does not grant them (harness.interpreter_paths)."""
    real = os.path.realpath
    prefix = os.path.dirname(os.path.dirname(real(python)))
    out = set()
    for root in (prefix, "/usr", "/usr/local"):
        for lib in ("lib", "lib64"):
            d = os.path.join(root, lib)
            try:
                names = os.listdir(d)
            except OSError:
                continue
            for name in names:
                if name.startswith("python3"):
                    for sub in ("site-packages", "dist-packages"):
                        p = os.path.join(d, name, sub)
                        if os.path.isdir(p):
                            out.add(real(p))
    return sorted(out)


def bwrap_argv(python, tmp_bytes, as_root=False):
    argv = ["bwrap", "--unshare-all", "--unshare-user", "--die-with-parent", "--new-session",
            "--ro-bind", "/usr", "/usr"]
    if as_root:   # bwrap keeps capabilities for a privileged caller unless told otherwise
        argv += ["--cap-drop", "ALL"]
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(top):
            argv += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            argv += ["--ro-bind", top, top]
    prefix = os.path.dirname(os.path.dirname(os.path.realpath(python)))
    if not (prefix == "/usr" or prefix.startswith("/usr/")):
        argv += ["--ro-bind", prefix, prefix]
    for d in package_dirs(python):   # empty and read-only in here
        if d == "/usr" or d.startswith("/usr/") or d.startswith(prefix + "/"):
            argv += ["--tmpfs", d, "--remount-ro", d]
    argv += ["--size", str(tmp_bytes), "--tmpfs", "/tmp", "--dev", "/dev", "--proc", "/proc",
             "--hostname", "sandbox", "--chdir", "/tmp"]
    return argv


def _dropper(uid):
    def drop():
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
    return drop


_WARNED = set()


def _make_host_undumpable():
    """Without bwrap and without a uid drop the jobs share our uid: then /proc/<our pid>/mem, /fd and
    /environ would be open to them (ptrace access rules), seccomp cannot filter file opens, and no Yama
    may be there to help. A non-dumpable process denies all that to same-uid processes without
    CAP_SYS_PTRACE. Cost: no core dumps of the grader, and a debugger needs CAP_SYS_PTRACE."""
    try:
        import ctypes
        ctypes.CDLL(None).prctl(4, 0, 0, 0, 0)   # PR_SET_DUMPABLE = 4
    except Exception:   # noqa: BLE001 - best effort; seccomp still blocks ptrace/process_vm_*
        pass


def isolation_gaps(bwrap, namespaces, seccomp, landlock):
    """What the available layers leave open between jobs -> list of short reasons ([] = isolated)."""
    gaps = []
    if not bwrap and not landlock.startswith("on"):
        gaps.append("model code could read the host's files: no bubblewrap and Landlock is " + landlock)
    if not namespaces.startswith("on"):
        if not seccomp.startswith("on"):
            gaps.append("no per-job namespaces (" + namespaces + ") and seccomp is " + seccomp)
        if not landlock.startswith("on"):
            gaps.append("no per-job namespaces (" + namespaces + ") and Landlock is " + landlock)
    return gaps


class Sandbox:
    """One zygote. `run(job)` sends a job and returns the zygote's reply dict; raises SandboxError if the
    zygote crashed/hung (the zygote is then dead; call `start()` again or let the worker restart it).
    Start it from a thread that outlives it: bwrap's --die-with-parent follows the starting thread."""

    def __init__(self, slot=0, use_bwrap="auto", tmp_mb=64, seccomp=True, namespaces=True, isolate=True):
        self.slot = slot
        self.use_bwrap = use_bwrap
        # test knobs, False only in tests that show what a layer stops: seccomp (seccomp and Landlock),
        # namespaces (the per-job ones: False gives the flat mode), isolate (every per-job layer and the cleanup)
        self.seccomp = seccomp
        self.namespaces = namespaces
        self.isolate = isolate
        self.tmp_mb = tmp_mb
        self.proc = None
        self.info = {}
        self._hostdir = None

    # --- lifecycle
    def start(self, timeout=30.0):
        self.close()
        drop = drop_privileges_wanted()
        python = sandbox_python(drop)
        if python is None:   # no interpreter an unprivileged uid can run: stay root, say so in health
            drop, python = False, os.path.realpath(getattr(sys, "_base_executable", sys.executable))
        # a uid per (server, worker): NPROC budgets and sweeps never reach another worker or server
        uid = 100000 + (os.getpid() % 10000) * 256 + self.slot % 256 if drop else None
        bw = self.use_bwrap
        if bw == "auto":
            bw = bwrap_works(python, uid)
        if bw:
            argv = bwrap_argv(python, self.tmp_mb << 20, as_root=os.geteuid() == 0 and uid is None)
            workdir = "/tmp"
        else:
            argv = []
            self._hostdir = tempfile.mkdtemp(prefix="pgrpo-sbx-")
            if uid is not None:
                os.chown(self._hostdir, uid, uid)
            workdir = self._hostdir
        if not bw and uid is None and os.geteuid() == 0 and os.environ.get("PGRPO_SANDBOX_KEEP_ROOT") != "1":
            # root ignores RLIMIT_NPROC and the between-jobs sweep would hit the server: leftovers of one job
            # (a setsid daemon) could outlive it and forge the next job's loophole marker. Refuse, unless asked.
            self.close()
            raise SandboxError("refusing to run model code as root without bubblewrap or a uid to drop to: "
                               "install bubblewrap, set PGRPO_SANDBOX_PYTHON to an interpreter an unprivileged "
                               "user can run, or run the grader as a non-root user.")
        if not bw and uid is None:
            _make_host_undumpable()
        with open(HARNESS_PATH, encoding="utf-8") as f:
            src = f.read()
        argv += [python, "-I", "-S", "-c", src]
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": workdir}
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, start_new_session=True, env=env,
                                     cwd="/" if bw else workdir,
                                     preexec_fn=_dropper(uid) if uid is not None else None)
        # sweep = kill(-1) after each job: safe only inside our own pid namespace or our own uid
        self._send({"workdir": workdir, "sweep": bool(bw or uid is not None), "private_dev": bool(bw),
                    "private_net": bool(bw), "tmp_mb": int(self.tmp_mb), "seccomp": bool(self.seccomp),
                    "namespaces": bool(self.namespaces), "isolate": bool(self.isolate),
                    "forbid": [PACKAGE_DIR, os.path.dirname(PACKAGE_DIR)]})
        try:
            ready = self._recv(time.monotonic() + timeout)
        except SandboxError:
            self.close()
            raise
        if not isinstance(ready, dict) or not ready.get("ready"):
            self.close()
            raise SandboxError("sandbox failed to start")
        seccomp = str(ready.get("seccomp", "off: unknown"))
        landlock = str(ready.get("landlock", "off: unknown"))
        namespaces = str(ready.get("namespaces", "off: unknown"))
        weak = isolation_gaps(bool(bw), namespaces, seccomp, landlock)
        tested = not (self.seccomp and self.namespaces and self.isolate)   # a test asked for fewer layers
        if weak and not tested and os.environ.get("PGRPO_SANDBOX_ALLOW_WEAK") != "1":
            self.close()
            raise IsolationError("jobs cannot be isolated here (" + "; ".join(weak) + "): run the grader where "
                                 "bubblewrap or user namespaces work, on a kernel with Landlock (5.13+) and "
                                 "seccomp, or set PGRPO_SANDBOX_ALLOW_WEAK=1 to grade anyway.")
        if seccomp != "on" and not tested and seccomp not in _WARNED:
            _WARNED.add(seccomp)
            print(f"pgrpo grader: WARNING: seccomp filter for jobs is {seccomp}; a response could signal "
                  f"other processes of uid {uid if uid is not None else os.geteuid()}", file=sys.stderr, flush=True)
        self.info = {"bwrap": bool(bw), "uid": uid if uid is not None else os.geteuid(),
                     "python": python, "python_version": ready.get("python"), "pid": self.proc.pid,
                     "seccomp": seccomp, "landlock": landlock, "namespaces": namespaces,
                     "isolation": "weak: " + "; ".join(weak) if weak else "full"}
        return self

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def kill(self):
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.proc.kill()
        except OSError:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except OSError:
                pass
        self.proc = None

    def close(self):
        self.kill()
        if self._hostdir:
            shutil.rmtree(self._hostdir, ignore_errors=True)
            self._hostdir = None

    # --- protocol (frames: frame.py)
    def _send(self, obj):
        try:
            frame.write_fd(self.proc.stdin, obj)
        except (BrokenPipeError, OSError, ValueError) as e:
            raise SandboxError(f"sandbox pipe closed ({e.__class__.__name__})") from None

    def _recv(self, deadline):
        try:
            return frame.read_fd(self.proc.stdout.fileno(), MAX_REPLY, deadline)
        except frame.FrameError as e:
            raise SandboxError(f"sandbox reply: {e}") from None

    def run(self, job, grace=10.0):
        """Run one job; the zygote enforces job["time_limit"]; we allow `grace` seconds on top."""
        if not self.alive():
            raise SandboxError("sandbox is not running")
        try:
            self._send(job)
            reply = self._recv(time.monotonic() + float(job["time_limit"]) + grace)
        except SandboxError:
            self.kill()
            raise
        if not isinstance(reply, dict) or "status" not in reply:
            self.kill()
            raise SandboxError("sandbox reply has the wrong shape")
        if reply["status"] == "error":
            raise SandboxError("sandbox internal error: " + str(reply.get("error"))[:200])
        return reply
