"""The real grader server, started the way each deployment starts it (for the isolation and seccomp tests).

Deployments (`serve(kind)`), all real `pgrpo grader serve` processes:
  bwrap       the default: bubblewrap; as root also a uid per worker; per-job namespaces inside
  no-bwrap    --no-bwrap; as root a uid per worker; per-job namespaces (user namespaces work here)
  compose     the docker-compose grader: --no-bwrap, ONE unprivileged uid for server, zygotes and jobs, and no
              user namespaces. As root the server runs under a throwaway uid; the "no user namespaces" part is
              the kernel's own refusal, made by an outer seccomp filter like Docker's default profile (unshare,
              setns, mount and clone with namespace flags -> EPERM, clone3 -> ENOSYS) that the server and
              everything below it inherit. So the sandbox runs in its flat mode, exactly as in a container.
  nonroot-ns  --no-bwrap under one unprivileged uid, user namespaces allowed (a plain Linux host)
  root-flat   root, --no-bwrap, no user namespaces (root in a container): a uid per worker, flat mode
"""
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from pgrpo.grader.client import GraderClient, GraderError
from pgrpo.grader.sandbox import sandbox_python

REPO = Path(__file__).resolve().parents[1]
KINDS = ("bwrap", "no-bwrap", "compose", "nonroot-ns", "root-flat")


def harness():
    """pgrpo/grader/harness.py as a module (it is never imported by the package itself)."""
    spec = importlib.util.spec_from_file_location("pgrpo_harness", REPO / "pgrpo" / "grader" / "harness.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def free_uid():
    """A uid no process uses right now (a throwaway identity for a server run as 'someone else')."""
    used = set()
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                used.add(os.stat(f"/proc/{name}").st_uid)
            except OSError:
                pass
    uid = 61000 + os.getpid() % 3000
    while uid in used:
        uid += 1
    return uid


NO_USERNS = r'''#!{python}
# Like Docker's default seccomp profile for what matters here: no unshare/setns/mount, no clone with namespace
# flags (EPERM), no clone3 (ENOSYS, so glibc falls back to clone). Then the real interpreter runs the command.
import ctypes, os, struct, sys
prog = {prog!r}
buf = ctypes.create_string_buffer(prog, len(prog))
class F(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]
f = F(len(prog) // 8, ctypes.addressof(buf))
libc = ctypes.CDLL(None)
assert libc.prctl(38, 1, 0, 0, 0) == 0 and libc.prctl(22, 2, ctypes.byref(f), 0, 0) == 0
os.execv({python!r}, [{python!r}] + sys.argv[1:])
'''


def no_userns_program(also_eperm=()):
    """The outer filter's BPF; `also_eperm`: more syscall names to refuse (e.g. an engine without Landlock)."""
    h = harness()
    machine = os.uname().machine
    i = h.ARCH_INDEX[machine]
    num = {k: v[i] for k, v in h.SYSCALLS.items()}
    LD, JEQ, JSET, RET = 0x20, 0x15, 0x45, 0x06
    ALLOW, EPERM, ENOSYS = 0x7FFF0000, 0x00050001, 0x00050026
    ins = [(LD, 0, 0, 4), (JEQ, 1, 0, h.AUDIT_ARCH[machine]), (RET, 0, 0, ALLOW), (LD, 0, 0, 0)]
    denied = [num["unshare"], num["setns"], num["mount"]] + [num[n] for n in also_eperm]
    for k, n in enumerate(denied):   # each jumps to the EPERM at the end
        ins.append((JEQ, 0, 0, n))
    ins += [(JEQ, 0, 0, num["clone3"]), (JEQ, 0, 0, num["clone"]), (RET, 0, 0, ALLOW),
            (LD, 0, 0, 16), (JSET, 0, 1, h.CLONE_NS), (RET, 0, 0, EPERM), (RET, 0, 0, ALLOW),
            (RET, 0, 0, EPERM), (RET, 0, 0, ENOSYS)]
    n = len(ins)
    eperm_at, enosys_at, clone_at = n - 2, n - 1, 4 + len(denied) + 3
    for k in range(len(denied)):
        pc = 4 + k
        ins[pc] = (JEQ, eperm_at - pc - 1, 0, ins[pc][3])
    pc = 4 + len(denied)
    ins[pc] = (JEQ, enosys_at - pc - 1, 0, ins[pc][3])
    ins[pc + 1] = (JEQ, clone_at - (pc + 1) - 1, 0, ins[pc + 1][3])
    import struct
    return b"".join(struct.pack("=HBBI", *x) for x in ins)


class Server:
    """A running `pgrpo grader serve` of one deployment kind; `.client()`, `.pid`, `.stop()`."""

    def __init__(self, kind, workers=1, extra=(), also_eperm=(), env=None):
        self.kind = kind
        root = os.geteuid() == 0
        self.dir = tempfile.mkdtemp(prefix=f"pgrpo-{kind}-")
        os.chmod(self.dir, 0o755)
        self.sock = os.path.join(self.dir, "grader.sock")
        self.log_path = os.path.join(self.dir, "server.log")
        python, kw, prefix = sys.executable, {}, []
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONPATH": str(REPO), "HOME": self.dir, **(env or {})}
        args = ["--socket", self.sock, "--workers", str(workers), "--exit-with-parent"] + list(extra)
        if kind != "bwrap":
            args.append("--no-bwrap")
        if kind in ("compose", "nonroot-ns") and root:   # like `user: 10001`: a throwaway uid
            python = sandbox_python(True)
            if python is None:
                pytest.skip("no python interpreter an unprivileged uid can run")
            self.uid = free_uid()
            os.chown(self.dir, self.uid, self.uid)
            kw = {"user": self.uid, "group": self.uid, "extra_groups": []}
        elif kind in ("compose", "nonroot-ns"):
            self.uid = os.geteuid()
        if kind == "root-flat" and not root:
            pytest.skip("root-flat needs root")
        if kind in ("compose", "root-flat"):
            real = os.path.realpath(python)
            wrapper = os.path.join(self.dir, "python-no-userns")
            Path(wrapper).write_text(NO_USERNS.format(python=real, prog=no_userns_program(also_eperm)))
            os.chmod(wrapper, 0o755)
            python = wrapper
        self.log = open(self.log_path, "w+b")
        self.proc = subprocess.Popen(prefix + [python, "-m", "pgrpo", "grader", "serve"] + args, cwd=self.dir,
                                     env=env, stdin=subprocess.DEVNULL, stdout=self.log, stderr=self.log,
                                     start_new_session=True, **kw)
        self.pid = self.proc.pid
        probe = GraderClient(self.sock, timeout=30, retries=0)
        deadline = time.monotonic() + 60
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"{kind} server exited: {self.log_text()}")
            try:
                self.health = probe.health()
                break
            except GraderError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise AssertionError(f"{kind} server did not start: {self.log_text()}")
                time.sleep(0.1)

    def log_text(self):
        self.log.flush()
        return Path(self.log_path).read_text(errors="replace")[-3000:]

    def client(self, timeout=120):
        return GraderClient(self.sock, timeout=timeout, retries=0)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()
        return False


def expect_mode(kind, sandbox):
    """What each deployment must come up with (checked on the health reply's sandbox block)."""
    assert sandbox["seccomp"] == "on" and sandbox["landlock"].startswith("on"), sandbox
    assert sandbox["bwrap"] is (kind == "bwrap"), sandbox
    flat = kind in ("compose", "root-flat")
    assert sandbox["namespaces"].startswith("off" if flat else "on"), sandbox
    assert sandbox["isolation"] == "full", sandbox
