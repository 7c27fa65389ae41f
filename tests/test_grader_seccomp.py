"""The per-job seccomp filter and Landlock rules: responses cannot signal, ptrace or peek into other
processes, open Unix sockets, make kernel objects that outlive them, or write outside their own job dir.

Why it matters: in the docker-compose grader (no bwrap, one unprivileged uid for server, zygotes and jobs,
no user namespaces) a response that does `os.kill(-1, 9)`, kills its parent chain or unlinks the grader's
socket would take the grading service down.
Here the server runs exactly like that (grader_deployments.py: --no-bwrap, one throwaway uid, user namespaces
refused by the kernel as in a default container), with user namespaces, and in default mode. The attacker is
told the server's pid and socket path (a real one would have to find them; Landlock hides /proc). A control
without the filter shows the same attacks really kill a same-uid victim, reach a Unix socket and write beside
the job dir.

Safety: every batch that sends real SIGKILLs is preceded by a probe that only uses signal 0 (harmless)
and must come back `correct` (= every probe was refused) before anything dangerous is sent.
"""
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import pytest

from grader_deployments import Server, harness

from pgrpo.data.problems import builtin_problems
from pgrpo.grader.client import LocalGrader
from pgrpo.grader.grade import GradeConfig, grade_response
from pgrpo.grader.sandbox import Sandbox

REPO = Path(__file__).resolve().parents[1]
SUM = next(p for p in builtin_problems() if p.id == "b001")   # sumOfEvens(nums) -> int
HONEST = "        return sum(x for x in nums if x % 2 == 0)\n"
FAST = {"time_limit": 2.0}
X86_64 = platform.machine() == "x86_64"
NR = {"x86_64": {"kill": 62, "tgkill": 234}, "aarch64": {"kill": 129, "tgkill": 131}}.get(platform.machine())
pytestmark = pytest.mark.skipif(NR is None, reason="the seccomp filter exists for x86_64 and aarch64 only")


def block(code):
    return f"```python\n{code}\n```\n"


def solution(body=HONEST, pre=""):
    return block(f"{pre}\nclass Solution:\n    def sumOfEvens(self, nums):\n{body}")


# i386 `kill` through `int 0x80` on x86_64: a different syscall table the filter must not let through
INT80 = '''
import ctypes, mmap
def int80_kill(pid, sig):
    code = (b"\\x53\\xb8" + (37).to_bytes(4, "little") + b"\\xbb" + pid.to_bytes(4, "little") + b"\\xb9" +
            sig.to_bytes(4, "little") + b"\\xcd\\x80\\x5b\\xc3")   # push rbx; eax=37 ebx ecx; int 0x80; pop; ret
    m = mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    m.write(code)
    return ctypes.CFUNCTYPE(ctypes.c_int)(ctypes.addressof(ctypes.c_char.from_buffer(m)))()
'''
# Whether this kernel runs i386 syscalls at all (ia32 emulation can be compiled out or booted off; then
# `int 0x80` faults). Probed in a throwaway interpreter with the harmless signal 0.
IA32 = X86_64 and subprocess.run([sys.executable, "-c", INT80 + "import os\nprint(int80_kill(os.getpid(), 0))"],
                                 capture_output=True, timeout=60).stdout.strip() == b"0"


def target(server_pid, sockdir):
    return f"import os\nSERVER = {server_pid}\nSOCKDIR = {sockdir!r}\n"


# Harmless probe (signal 0 checks permission only, opens are read-only or in the socket dir): the honest answer
# comes back only if EVERY attempt was refused or could not reach its target (a pid or path that does not exist
# in the sandbox), so `correct` means the filter, Landlock and the undumpable server held.
def probe(server_pid, sockdir):
    return solution(HONEST, pre=target(server_pid, sockdir) + """
BLOCKED = []
for attempt in (lambda: os.kill(os.getppid(), 0), lambda: os.kill(-1, 0), lambda: os.kill(SERVER, 0),
                lambda: os.killpg(0, 0), lambda: os.pidfd_open(os.getppid()),
                lambda: __import__("socket").socket(1),   # AF_UNIX: the grader's socket is out of reach
                lambda: open("../landlock-probe", "w"),     # landlock: nothing writable beside the job dir
                lambda: open(os.path.join(SOCKDIR, "probe"), "w"),
                lambda: open("/proc/%d/mem" % SERVER, "rb"),
                lambda: os.listdir("/proc")):
    try:
        attempt()
        BLOCKED.append(False)
    except OSError:   # EPERM/EACCES (refused), EROFS (read-only), ESRCH/ENOENT (out of sight)
        BLOCKED.append(True)
if not all(BLOCKED):
    raise SystemExit(repr(BLOCKED))
""")


def attacks(server_pid, sockdir):
    """The real thing. Each must be answered `incorrect`, and none may cost a sandbox restart or the server."""
    t = target(server_pid, sockdir)
    out = [
        ("kill_parent_in_method", solution("        import os\n        os.kill(os.getppid(), 9)\n" + HONEST)),
        ("kill_parent_at_import", solution(pre="import os\nos.kill(os.getppid(), 9)\n")),
        ("kill_everyone_in_method", solution("        import os\n        os.kill(-1, 9)\n" + HONEST)),
        ("kill_everyone_at_import", solution(pre="import os\nos.kill(-1, 9)\n")),
        ("kill_server_at_import", solution(pre=t + "os.kill(SERVER, 9)\n")),
        ("pid_scan_at_import", solution(pre=(
            "import os, signal\nfor pid in range(2, 1 << 16):\n"
            "    if pid != os.getpid():\n"
            "        try:\n            os.kill(pid, signal.SIGKILL)\n        except ProcessLookupError:\n"
            "            pass\n"))),
        ("unlink_grader_socket", solution(pre=t + "os.unlink(os.path.join(SOCKDIR, 'grader.sock'))\n")),
        ("sigio_to_server", solution(pre=t + (
            "import fcntl\nr, w = os.pipe()\nfcntl.fcntl(r, fcntl.F_SETOWN, SERVER)\n"
            "fcntl.fcntl(r, fcntl.F_SETFL, os.O_ASYNC)\nos.write(w, b'x')\n"))),
        ("pidfd_kill_parent", solution(pre="import os, signal\n"
                                            "signal.pidfd_send_signal(os.pidfd_open(os.getppid()), 9)\n")),
        ("raw_syscall_kill_everyone", solution(pre="import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\n"
                                                   f"if libc.syscall({NR and NR['kill']}, -1, 9) != 0:\n"
                                                   "    raise OSError(ctypes.get_errno(), 'kill')\n")),
    ]
    if IA32:   # i386 table via int 0x80: kill(-1, 9); returns -errno
        out.append(("int80_kill_everyone", solution(pre=INT80 + "if int80_kill(-1, 9) != 0:\n    raise OSError\n")))
    return out


def check_service(client, workers, server_pid, sockdir):
    """The full sequence against one running server: probe, attacks, then the service must be intact."""
    h0 = client.health()
    assert h0["sandbox"]["seccomp"] == "on" and h0["sandbox"]["landlock"].startswith("on"), h0["sandbox"]
    pr = client.grade([{"problem": SUM, "response": probe(server_pid, sockdir), "mode": "none", "id": "probe"}],
                      config=FAST)[0]
    assert pr["label"] == "correct", pr   # never send real kills if the harmless probe got through
    for mode in ("none", "run_tests"):
        results = client.grade([{"problem": SUM, "response": r, "mode": mode, "id": n}
                                for n, r in attacks(server_pid, sockdir)], config=FAST)
        bad = [(r["id"], r["label"], r["error"]) for r in results if r["label"] != "incorrect"]
        assert not bad, bad
        assert all(r["gt_pass_rate"] == 0.0 for r in results)
    h = client.health()
    assert h["ok"] and h["alive"] == h["workers"] == workers
    assert h["pid"] == h0["pid"] and h["sandbox_pids"] == h0["sandbox_pids"] and h["restarts"] == 0, h
    after = client.grade([{"problem": SUM, "response": solution(), "mode": "none"}], config=FAST)[0]
    assert after["label"] == "correct"


@pytest.mark.parametrize("kind", ["compose", "nonroot-ns"])
def test_no_bwrap_same_uid_service_survives_kill_attacks(kind):
    """The docker-compose deployment (and the same without a container, user namespaces allowed): --no-bwrap,
    the server and its sandboxes share one uid."""
    with Server(kind, workers=2) as srv:
        h = srv.health
        assert h["sandbox"]["bwrap"] is False and h["sandbox"]["uid"] == srv.uid
        check_service(srv.client(), workers=2, server_pid=srv.pid, sockdir=srv.dir)
        assert srv.proc.poll() is None


def test_default_mode_service_survives_kill_attacks():
    """With bwrap (and, as root, a uid per worker) the kills could only hit the sandbox itself; with the
    filter they do not even cost a sandbox restart."""
    with LocalGrader(workers=1) as g:
        check_service(g.client(timeout=120), workers=1, server_pid=g.proc.pid,
                      sockdir=os.path.dirname(g.socket_path))
        assert g.alive()


def test_control_without_the_filter_the_same_kills_land(monkeypatch, tmp_path):
    """Same-uid victims, the real sandbox without bwrap, without a uid drop and without per-job namespaces (the
    flat mode: a pid namespace would hide the victims by itself): without the filter each technique kills its
    victim (and a Unix socket can be reached); with it every victim survives, nothing connects, and the
    response is graded incorrect."""
    monkeypatch.setenv("PGRPO_SANDBOX_KEEP_ROOT", "1")   # as root: stay root, i.e. the victims' uid

    def attack(v):
        pre = (INT80 if IA32 else "") + "import ctypes, os, signal, socket\nlibc = ctypes.CDLL(None, use_errno=True)\n"
        steps = [f"socket.socket(socket.AF_UNIX).connect({listen_path!r})",
                 f"open({outside!r}, 'w').close()",
                 f"os.killpg({v[1]}, 9)",                                   # victims lead their own group
                 f"signal.pidfd_send_signal(os.pidfd_open({v[2]}), 9)",
                 f"libc.syscall({NR['kill']}, {v[3]}, 9)",
                 f"libc.syscall({NR['tgkill']}, {v[4]}, {v[4]}, 9)"]
        if IA32:
            steps.append(f"int80_kill({v[5]}, 9)")
        for s in steps:
            pre += f"try:\n    {s}\nexcept OSError:\n    pass\n"
        return solution(f"        os.kill({v[0]}, 9)\n" + HONEST, pre=pre)

    import socket
    outside = str(tmp_path / "written-by-the-job")   # a place beside the job dir
    listen_path = str(tmp_path / "service.sock")   # stands in for the grader's socket
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(listen_path)
    listener.listen(8)
    listener.setblocking(False)

    def connections():
        n = 0
        while True:
            try:
                listener.accept()[0].close()
                n += 1
            except BlockingIOError:
                return n

    outcome = {}
    for seccomp in (False, True):
        victims = [subprocess.Popen(["sleep", "60"], start_new_session=True) for _ in range(6)]
        sb = Sandbox(use_bwrap=False, seccomp=seccomp, namespaces=False).start()
        try:
            assert sb.info["uid"] == os.geteuid() and sb.info["namespaces"].startswith("off")
            assert sb.info["seccomp"] == ("on" if seccomp else "off: disabled by the host")
            assert sb.info["landlock"].startswith("on") == seccomp
            r = grade_response(SUM, attack([v.pid for v in victims]), "none", GradeConfig(time_limit=5), sb)
            time.sleep(0.1)
            outcome[seccomp] = (r, [v.poll() for v in victims], connections() + 10 * os.path.exists(outside))
            if os.path.exists(outside):
                os.unlink(outside)
        finally:
            sb.close()
            for v in victims:
                v.kill()
                v.wait()
    listener.close()
    n = 6 if IA32 else 5
    r, dead, conns = outcome[False]
    assert r["label"] == "correct"
    assert dead[:n] == [-9] * n and conns == 11, (dead, conns)   # connected once, wrote the file
    r, dead, conns = outcome[True]
    assert r["label"] == "incorrect" and r["gt_pass_rate"] == 0.0, r
    assert dead == [None] * 6 and conns == 0, (dead, conns)


LEGIT = ("        import threading, signal, sys, concurrent.futures as cf\n"
         "        sys.setrecursionlimit(20000)\n"
         "        def depth(n): return 0 if n == 0 else 1 + depth(n - 1)\n"
         "        assert depth(5000) == 5000\n"
         "        signal.setitimer(signal.ITIMER_REAL, 30.0)\n        signal.alarm(0)\n"
         "        out = []\n"
         "        t = threading.Thread(target=lambda: out.append(sum(x for x in nums if x % 2 == 0)))\n"
         "        t.start()\n        t.join()\n"
         "        with cf.ThreadPoolExecutor(4) as ex:\n"
         "            assert sum(ex.map(lambda x: x * (x % 2 == 0), nums)) == out[0]\n"
         "        import asyncio, socket\n"
         "        async def twice(v):\n            await asyncio.sleep(0)\n            return v\n"
         "        assert asyncio.run(twice(out[0])) == out[0]   # socketpair + epoll\n"
         "        import tempfile, os\n"
         "        with tempfile.NamedTemporaryFile('w+') as f, open(os.devnull, 'w') as null:\n"
         "            f.write('x'); f.flush(); null.write('y')\n"
         "        open('scratch.txt', 'w').write('z')\n"
         "        os.makedirs('a/b', exist_ok=True); os.rename('scratch.txt', 'a/b/s.txt'); os.remove('a/b/s.txt')\n"
         "        import hashlib, json, zlib, email.utils, sqlite3, zoneinfo, resource, random, os.path\n"
         "        assert hashlib.sha256(b'x').hexdigest() and zlib.compress(b'x') and json.dumps([1])\n"
         "        db = sqlite3.connect(':memory:'); db.execute('create table t (x)'); db.close()\n"
         "        resource.setrlimit(resource.RLIMIT_STACK, resource.getrlimit(resource.RLIMIT_STACK))\n"
         "        assert len(os.urandom(8)) == 8 and random.random() < 1\n"
         "        return out[0]\n")


@pytest.mark.parametrize("flat", [False, True])
def test_legit_code_still_works_under_the_filter(flat):
    """Threads, deep recursion, alarms and timers, asyncio, temp files, /dev/null, stdlib modules with C
    extensions that were not preloaded (hashlib, zlib, sqlite3 in memory), raising one's own rlimits: unaffected,
    in the per-job namespaces and in the flat mode. Inet sockets where the sandbox has its own network."""
    sb = Sandbox(namespaces=not flat).start()
    body = LEGIT if flat else LEGIT.replace("        return out[0]\n", "        socket.socket(socket.AF_INET, "
                                            "socket.SOCK_DGRAM).close()\n        return out[0]\n")
    try:
        assert sb.info["seccomp"] == "on" and sb.info["landlock"].startswith("on")
        r = grade_response(SUM, solution(body), "none", GradeConfig(time_limit=10), sb)
        own = grade_response(SUM, solution(pre="import os\nos.kill(os.getpid(), 0)\n"), "none",
                             GradeConfig(time_limit=5), sb)
    finally:
        sb.close()
    assert r["label"] == "correct", r
    # documented cost: signalling even itself is refused
    assert own["label"] == "incorrect" and "PermissionError" in own["error"]


def run_bpf(prog, arch, nr, args=()):
    """A tiny interpreter for the instruction kinds the filter uses (ld, jeq, jge, jset, ret), over one
    seccomp_data (nr, arch, the low 32 bits of args[0..5])."""
    data = {0: nr, 4: arch}
    for i in range(6):
        data[16 + 8 * i] = (list(args) + [0] * 6)[i] & 0xFFFFFFFF
    pc = 0
    while True:
        code, jt, jf, k = prog[pc]
        if code == 0x20:
            acc = data[k]
        elif code in (0x15, 0x35, 0x45):
            hit = acc == k if code == 0x15 else acc >= k if code == 0x35 else bool(acc & k)
            pc += jt if hit else jf
        elif code == 0x06:
            return k
        pc += 1


def test_filter_program_for_both_architectures():
    """Both arch variants decide right (aarch64 cannot run here, so it is simulated): every listed call is
    EPERM, clone3 ENOSYS, the argument rules hold, everything else is allowed; and the numbers match the
    kernel headers where they are installed."""
    import re
    import struct
    h = harness()
    allow, eperm, enosys = 0x7FFF0000, 0x00050001, 0x00050026
    for machine, other in (("x86_64", 0xC00000B7), ("aarch64", 0xC000003E)):
        idx = h.ARCH_INDEX[machine]
        num = {k: v[idx] for k, v in h.SYSCALLS.items() if v[idx] is not None}
        for inet in (True, False):
            raw = h.seccomp_program(machine, inet)
            prog = [struct.unpack("=HBBI", raw[i:i + 8]) for i in range(0, len(raw), 8)]
            arch = h.AUDIT_ARCH[machine]
            denied = {num[n] for n in h.SECCOMP_EPERM if n in num}
            assert len(denied) >= 80
            args_checked = {num[r[0]] for r in h.seccomp_args(inet)}
            for nr in range(0, 600):
                if nr in args_checked:
                    continue
                want = eperm if nr in denied else enosys if nr == num["clone3"] else allow
                assert run_bpf(prog, arch, nr) == want, (machine, nr)

            def call(name, *a):
                return run_bpf(prog, arch, num[name], a)
            assert call("clone", 17) == allow                          # fork(): SIGCHLD
            assert call("clone", 0x3D0F00) == allow                    # pthread_create's flags
            for ns in (0x10000000, 0x20000, 0x20000000, 0x40000000, 0x08000000, 0x04000000, 0x02000000):
                assert call("clone", 17 | ns) == eperm
            dom = {1: eperm, 2: allow if inet else eperm, 10: allow if inet else eperm, 16: eperm, 17: eperm}
            assert {d: call("socket", d) for d in dom} == dom
            assert call("socketpair", 1) == allow and call("socketpair", 2) == eperm
            for cmd in (5, 6, 7, 8, 10, 15, 36, 37, 38, 1024, 1026):   # locks, owners, signals, leases, notify
                assert call("fcntl", 3, cmd) == eperm
            for cmd in (0, 1, 2, 3, 4, 1030, 1031):                    # F_DUPFD GETFD SETFD GETFL SETFL, DUPFD_CLOEXEC
                assert call("fcntl", 3, cmd) == allow
            assert call("ioctl", 3, 0x8901) == eperm and call("ioctl", 3, 0x8902) == eperm
            assert call("ioctl", 1, 0x5401) == allow                   # TCGETS (isatty)
            assert call("prlimit64", 0) == allow and call("prlimit64", 1234) == eperm
            assert call("prctl", 1) == eperm and call("prctl", 15) == allow and call("prctl", 38) == allow
            for foreign in (other, 0x40000003, 0x40000028):   # the other 64-bit arch, i386, arm
                assert run_bpf(prog, foreign, 1) == eperm
            assert run_bpf(prog, arch, 0x40000000 + 62) == (eperm if machine == "x86_64" else allow)
    headers = {"x86_64": "/usr/include/x86_64-linux-gnu/asm/unistd_64.h",
               "aarch64": "/usr/include/asm-generic/unistd.h"}
    checked = 0
    for machine, path in headers.items():
        if not os.path.isfile(path):
            continue
        text = Path(path).read_text()
        for name, nrs in h.SYSCALLS.items():
            nr = nrs[h.ARCH_INDEX[machine]]
            m = re.search(rf"#define __NR(?:3264)?_{name}\s+(\d+)", text)
            if m is None:   # newer than these headers (fchmodat2, cachestat, setxattrat, ...) or not on this arch
                continue
            assert nr is not None and int(m.group(1)) == nr, (machine, name)
            checked += 1
    if not checked:
        pytest.skip("no kernel syscall headers installed to compare with")


OUTER_FILTER = r'''#!{python}
# Stands in for a kernel without seccomp: prctl(PR_SET_SECCOMP) gets EINVAL, seccomp(2) ENOSYS; then the
# real interpreter runs the harness.
import ctypes, os, struct, sys
NR = {{"x86_64": (157, 317, 0xC000003E), "aarch64": (167, 277, 0xC00000B7)}}[os.uname().machine]
ins = [(0x20, 0, 0, 4), (0x15, 0, 7, NR[2]), (0x20, 0, 0, 0), (0x15, 2, 0, NR[0]), (0x15, 0, 4, NR[1]),
       (0x06, 0, 0, 0x50000 | 38), (0x20, 0, 0, 16), (0x15, 0, 1, 22), (0x06, 0, 0, 0x50000 | 22),
       (0x06, 0, 0, 0x7FFF0000)]
code = b"".join(struct.pack("=HBBI", *i) for i in ins)
buf = ctypes.create_string_buffer(code, len(code))
class F(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]
f = F(len(ins), ctypes.addressof(buf))
libc = ctypes.CDLL(None)
assert libc.prctl(38, 1, 0, 0, 0) == 0 and libc.prctl(22, 2, ctypes.byref(f), 0, 0) == 0
os.execv({python!r}, [{python!r}] + sys.argv[1:])
'''


def test_without_seccomp_support_grading_still_works_and_says_so(tmp_path, monkeypatch, capsys):
    """A kernel that refuses the filter: the zygote records why, health shows it, the warning is printed
    once per reason, and responses are still graded."""
    wrapper = tmp_path / "python-no-seccomp"
    wrapper.write_text(OUTER_FILTER.format(python=os.path.realpath(sys.executable)))
    wrapper.chmod(0o755)
    monkeypatch.setenv("PGRPO_SANDBOX_PYTHON", str(wrapper))
    monkeypatch.setenv("PGRPO_SANDBOX_KEEP_ROOT", "1")
    statuses = []
    for _ in range(2):
        sb = Sandbox(use_bwrap=False).start()
        try:
            statuses.append(sb.info["seccomp"])
            r = grade_response(SUM, solution(), "none", GradeConfig(time_limit=5), sb)
            assert r["label"] == "correct", r
        finally:
            sb.close()
    assert statuses == ["off: the kernel refused the filter (Invalid argument)"] * 2
    assert capsys.readouterr().err.count("WARNING: seccomp filter for jobs is off") == 1
