"""Nothing of one response reaches another, model code cannot read the answer key, one response cannot degrade
another, and what the sandbox sends back costs bounded trusted time. Real servers, sandboxes and sockets.

Canaries: a job creates one object of every kind that could outlive it (files of odd modes, names and types,
file metadata, SysV shm/msg/sem, POSIX message queues, /dev/shm, keys in every keyring, setsid daemons and
orphans, a mount held by a daemon), then one checker job per kind looks for them and answers wrong if it finds
one; the test process also looks from outside (every process in host /proc, its mounts, SysV tables, files). Run through the real
server in every deployment (grader_deployments.py), on the per-job namespaces alone (seccomp and Landlock off),
and as a control with every layer and the cleanup off, where each checker must find its canary: so a checker
that could not see its object would fail the control.
"""
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from grader_deployments import KINDS, REPO, Server, expect_mode, free_uid, harness
from helpers import SHARED

from pgrpo.data.problems import builtin_problems, load_problems, problem_to_row
from pgrpo.grader import frame
from pgrpo.grader.claims import Report, matches
from pgrpo.grader.grade import GradeConfig, grade_response
from pgrpo.grader.sandbox import Sandbox

PROBLEMS = {p.id: p for p in builtin_problems()}
SUM = PROBLEMS["b001"]   # sumOfEvens(nums) -> int
HONEST = "        return sum(x for x in nums if x % 2 == 0)\n"
FAST = {"time_limit": 3.0}
pytestmark = pytest.mark.skipif(os.uname().machine not in ("x86_64", "aarch64"),
                                reason="the sandbox's filters exist for x86_64 and aarch64")


def block(code):
    return f"```python\n{code}\n```\n"


def solution(pre="", body=HONEST):
    return block(f"{pre}\nclass Solution:\n    def sumOfEvens(self, nums):\n{body}")


# ----------------------------------------------------------------------------- canaries

COMMON = r'''
import ctypes, os, signal, socket, struct, sys, time
L = ctypes.CDLL(None, use_errno=True)
L.syscall.restype = ctypes.c_long
NR = {"x86_64": dict(shmget=29, shmat=30, msgget=68, msgsnd=69, semget=64, add_key=248, request_key=249,
                     keyctl=250, unshare=272),
      "aarch64": dict(shmget=194, shmat=196, msgget=186, msgsnd=189, semget=190, add_key=217, request_key=218,
                      keyctl=219, unshare=97)}[os.uname().machine]
KEY = 0x5EC0FFEE        # SysV key
MAGIC = 1234567890123456789
NAME = "pgrpo-canary"
SPOTS = ["/tmp", "/dev/shm", "/var/tmp", "..", "/dev/mqueue", os.path.expanduser("~")]
def attempt(f):
    try:
        f()
    except Exception:
        pass
'''

CREATE = COMMON + r'''
# files of any mode, name and type, here and wherever else a job might write
attempt(lambda: os.mkdir("locked", 0))
def locked_full():
    os.mkdir("locked-full")
    open("locked-full/inside", "w").write("canary")
    os.chmod("locked-full", 0)
attempt(locked_full)
attempt(lambda: os.makedirs("deep/" * 40 + "end"))
attempt(lambda: open("odd\nname \udcff", "w").write("canary"))
attempt(lambda: os.symlink("/nonexistent-target", "link"))
attempt(lambda: os.mkfifo("fifo"))
attempt(lambda: socket.socket(socket.AF_UNIX).bind("sock"))
for d in SPOTS:
    attempt(lambda d=d: open(os.path.join(d, NAME), "w").write("canary"))
# metadata of what persists (the job dir itself without namespaces)
for d in (".", ".."):
    attempt(lambda d=d: os.utime(d, ns=(MAGIC, MAGIC)))
    attempt(lambda d=d: os.setxattr(d, "user." + NAME, b"canary"))
# SysV shared memory, message queue, semaphore
shm = L.syscall(NR["shmget"], KEY, 4096, 0o1666)
if shm >= 0:
    addr = L.syscall(NR["shmat"], shm, None, 0)
    if addr not in (-1, 0):
        ctypes.memmove(addr, b"canary", 6)
msq = L.syscall(NR["msgget"], KEY, 0o1666)
if msq >= 0:
    m = struct.pack("=q", 1) + b"canary"
    L.syscall(NR["msgsnd"], msq, m, 6, 0)
L.syscall(NR["semget"], KEY, 1, 0o1666)
# POSIX message queue (and its file in a mounted mqueue fs)
attempt(lambda: L.mq_open(b"/" + NAME.encode(), os.O_CREAT | os.O_RDWR, 0o600, None))
# keys in the session, user, user-session and persistent keyrings
for ring in (-3, -4, -5):
    L.syscall(NR["add_key"], b"user", NAME.encode(), b"canary", 6, ring)
pk = L.syscall(NR["keyctl"], 22, -1, -3)   # KEYCTL_GET_PERSISTENT, own uid, link into the session keyring
if pk >= 0:
    L.syscall(NR["add_key"], b"user", NAME.encode(), b"canary", 6, pk)
# processes: a setsid double-forked daemon that ignores SIGTERM/SIGHUP and holds a private mount, an orphan
def daemon(mount):
    pid = os.fork()
    if pid == 0:
        try:
            os.setsid()
            if os.fork() == 0:
                os.closerange(0, 256)
                L.prctl(15, NAME.encode(), 0, 0, 0)   # PR_SET_NAME: findable in /proc/*/comm
                for s in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
                    signal.signal(s, signal.SIG_IGN)
                if mount:
                    uid, gid = os.geteuid(), os.getegid()
                    os.makedirs("/tmp/" + NAME + "-mnt", exist_ok=True)
                    if L.syscall(NR["unshare"], 0x10000000 | 0x20000, 0, 0) == 0:   # user + mount namespace
                        L.prctl(4, 1, 0, 0, 0)   # dumpable: /proc/<pid>/root is then open to the same uid
                        open("/proc/self/setgroups", "w").write("deny")
                        open("/proc/self/uid_map", "w").write("%d %d 1" % (uid, uid))
                        open("/proc/self/gid_map", "w").write("%d %d 1" % (gid, gid))
                        L.mount(b"tmpfs", ("/tmp/" + NAME + "-mnt").encode(), b"tmpfs", 0, None)
                        open("/tmp/" + NAME + "-mnt/marker", "w").write("canary")
                time.sleep(30)
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
attempt(lambda: daemon(False))
attempt(lambda: daemon(True))
def orphan():
    if os.fork() == 0:
        os.closerange(0, 256)
        L.prctl(15, NAME.encode(), 0, 0, 0)
        time.sleep(30)
        os._exit(0)
attempt(orphan)
time.sleep(0.3)   # let the daemons get going
'''

# name -> module code that sets FOUND (True only on positive evidence; "cannot look" is not evidence)
CHECKS = {
    "files": r'''
FOUND = bool(os.listdir("."))
for d in SPOTS:
    FOUND = FOUND or os.path.lexists(os.path.join(d, NAME))
''',
    "metadata": r'''
FOUND = False
for d in (".", ".."):
    try:
        FOUND = FOUND or os.stat(d).st_mtime_ns == MAGIC or os.getxattr(d, "user." + NAME) == b"canary"
    except OSError:
        pass
''',
    "sysv": r'''
FOUND = (L.syscall(NR["shmget"], KEY, 0, 0) >= 0 or L.syscall(NR["msgget"], KEY, 0) >= 0
         or L.syscall(NR["semget"], KEY, 0, 0) >= 0)
''',
    "mqueue": r'''
FOUND = os.path.lexists("/dev/mqueue/" + NAME)
try:
    FOUND = FOUND or L.mq_open(b"/" + NAME.encode(), os.O_RDONLY, 0, None) >= 0
except Exception:
    pass
''',
    "keys": r'''
FOUND = L.syscall(NR["request_key"], b"user", NAME.encode(), None, 0) >= 0
for ring in (-3, -4, -5):
    FOUND = FOUND or L.syscall(NR["keyctl"], 10, ring, b"user", NAME.encode(), 0) >= 0   # KEYCTL_SEARCH
pk = L.syscall(NR["keyctl"], 22, -1, 0)
FOUND = FOUND or (pk >= 0 and L.syscall(NR["keyctl"], 10, pk, b"user", NAME.encode(), 0) >= 0)
''',
    "processes": r'''
FOUND = False
try:
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                FOUND = FOUND or open("/proc/%s/comm" % p).read().strip() == NAME
            except OSError:
                pass
except OSError:
    pass
''',
}


def canary_items():
    items = [{"problem": SUM, "response": solution(CREATE), "mode": "none", "id": "create"}]
    for name, code in CHECKS.items():
        body = "        return -1 if FOUND else sum(x for x in nums if x % 2 == 0)\n"
        items.append({"problem": SUM, "response": solution(COMMON + code, body), "mode": "none", "id": name})
    return items


def outside_leftovers():
    """What the test process itself sees of canaries on the host (every pid namespace shows in host /proc)."""
    found = []
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        try:
            if Path(f"/proc/{p}/comm").read_text().strip() == "pgrpo-canary":
                found.append(f"process {p}")
        except OSError:
            pass
        if found and found[-1] == f"process {p}":   # a mount can only outlive a job in a namespace a process of
            try:                                     # it holds: one of its own, unlike its parent's
                ppid = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[1]
                if os.readlink(f"/proc/{p}/ns/mnt") != os.readlink(f"/proc/{ppid}/ns/mnt"):
                    found.append(f"mount namespace held by {p}")
            except OSError:
                pass
    for table in ("shm", "msg", "sem"):
        text = Path(f"/proc/sysvipc/{table}").read_text()
        if str(0x5EC0FFEE) in text.split():
            found.append(f"sysv {table}")
    for d in ("/tmp", "/dev/shm", "/var/tmp", "/dev/mqueue"):
        if os.path.lexists(os.path.join(d, "pgrpo-canary")) or os.path.lexists(os.path.join(d, "pgrpo-canary-mnt")):
            found.append(f"file in {d}")
    return found


def kill_canaries():
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                if Path(f"/proc/{p}/comm").read_text().strip() == "pgrpo-canary":
                    os.kill(int(p), signal.SIGKILL)
            except OSError:
                pass


def judge(results):
    """-> {checker: found?}; the creator must have been graded; a checker that crashed is a test bug."""
    by = {r["id"]: r for r in results}
    assert by["create"]["can_compile"], by["create"]
    out = {}
    for name in CHECKS:
        r = by[name]
        assert r["error"] is None, (name, r["error"])   # found = a wrong answer, never a crash
        out[name] = r["label"] != "correct"
    return out


@pytest.mark.parametrize("kind", KINDS)
def test_nothing_a_job_creates_reaches_a_later_job(kind):
    with Server(kind) as srv:
        expect_mode(kind, srv.health["sandbox"])
        try:
            results = srv.client().grade(canary_items(), config=FAST)
            leftovers = outside_leftovers()
        finally:
            kill_canaries()
        h = srv.client().health()
    found = judge(results)
    assert not any(found.values()), (kind, found)
    assert not leftovers, (kind, leftovers)
    assert h["alive"] == h["workers"] and h["restarts"] == 0


def test_namespaces_alone_keep_jobs_apart():
    """seccomp and Landlock off: the per-job namespaces (and fresh tmpfs) must contain every canary by
    themselves, although here the creator really makes its objects (the filter no longer refuses them)."""
    sb = Sandbox(seccomp=False).start()
    try:
        assert sb.info["namespaces"].startswith("on") and sb.info["seccomp"].startswith("off")
        results = [grade_response(it["problem"], it["response"], "none", GradeConfig(time_limit=3), sb,
                                  item_id=it["id"]) for it in canary_items()]
    finally:
        sb.close()
        kill_canaries()
    found = judge(results)
    assert not any(found.values()), found


def test_control_every_canary_is_visible_without_isolation():
    """The control: a bubblewrap sandbox (so nothing reaches the host) with every per-job layer and the cleanup
    switched off. Each checker must find its canary here, and the test process must see the surviving daemons
    and the mount one of them holds; otherwise the suite above could not fail."""
    sb = Sandbox(use_bwrap=True, isolate=False).start()
    try:
        results = [grade_response(it["problem"], it["response"], "none", GradeConfig(time_limit=3), sb,
                                  item_id=it["id"]) for it in canary_items()]
        leftovers = outside_leftovers()
    finally:
        sb.close()
        kill_canaries()
    found = judge(results)
    assert all(found.values()), found
    assert any(x.startswith("process") for x in leftovers) and any(x.startswith("mount") for x in leftovers), \
        leftovers


# ----------------------------------------------------------------------------- concurrent jobs

CHANNEL = COMMON + r'''
import fcntl, threading
PORT = 47123
STDLIB = os.__file__
def send():
    t = time.monotonic() + 1.5
    while time.monotonic() < t:
        attempt(lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b"canary", ("127.0.0.1", PORT)))
        def unix():
            s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            s.sendto(b"canary", "\0" + NAME)
        attempt(unix)
        attempt(lambda: open("/tmp/" + NAME, "w").write("canary"))
        def lock():
            fd = os.open(STDLIB, os.O_RDONLY)
            fcntl.flock(fd, fcntl.LOCK_EX)
            time.sleep(0.05)
        attempt(lock)
        time.sleep(0.01)
def listen():
    got = []
    socks = []
    def udp():
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("127.0.0.1", PORT))
        socks.append(s)
    def unix():
        s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        s.bind("\0" + NAME)
        socks.append(s)
    attempt(udp)
    attempt(unix)
    for s in socks:
        s.settimeout(0.01)
    t = time.monotonic() + 2.0
    while time.monotonic() < t and not got:
        for s in socks:
            try:
                got.append(s.recv(64))
            except Exception:
                pass
        if os.path.lexists("/tmp/" + NAME):
            got.append("file")
        def probe_lock():
            fd = os.open(STDLIB, os.O_RDONLY)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                fcntl.flock(fd, fcntl.LOCK_UN)
            except BlockingIOError:
                got.append("lock")
            finally:
                os.close(fd)
        attempt(probe_lock)
    return bool(got)
'''


def channel_items():
    return [{"problem": SUM, "response": solution(CHANNEL + "FOUND = listen()\n",
                                                  "        return -1 if FOUND else sum(x for x in nums if x % 2 == 0)\n"),
             "mode": "none", "id": "listen"},
            {"problem": SUM, "response": solution(CHANNEL + "send()\n"), "mode": "none", "id": "send"}]


@pytest.mark.parametrize("kind", ["bwrap", "compose"])
def test_no_channel_between_concurrent_jobs(kind):
    """Two workers, a listener and a sender at the same time: UDP on loopback, an abstract Unix socket, a file,
    a lock on a shared read-only file. Nothing gets through."""
    with Server(kind, workers=2) as srv:
        listen, send = srv.client().grade(channel_items(), config=FAST)
    assert listen["error"] is None and listen["label"] == "correct", listen
    assert send["can_compile"]


def test_control_concurrent_jobs_without_isolation_do_talk():
    sandboxes = [Sandbox(use_bwrap=False, isolate=False, slot=i).start() for i in range(2)]
    out = {}
    try:
        items = channel_items()

        def run(i):
            it = items[i]
            out[it["id"]] = grade_response(it["problem"], it["response"], "none", GradeConfig(time_limit=3),
                                           sandboxes[i])
        threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        for sb in sandboxes:
            sb.close()
        if os.path.lexists("/tmp/pgrpo-canary"):
            os.unlink("/tmp/pgrpo-canary")
    assert out["listen"]["error"] is None and out["listen"]["label"] == "incorrect", out["listen"]


# ----------------------------------------------------------------------------- the answer key

# graded as this problem: the search's method returns how many files held a needle, and the right answer is 0
HITS = problem_to_row(SUM) | {"id": "hits", "gt_answer": ["assert Solution().sumOfEvens(nums = []) == 0"]}


def search_response(needles):
    """Module code that reads every file it can (likely places first, then the whole tree; /proc, /sys and /dev
    aside), looking for `needles`; the method answers the number of files that held one."""
    hints = [str(REPO / "pgrpo" / "data"), str(REPO), str(SHARED.parent), "/work", "/root", "/app", "/tmp",
             "/usr/lib", "/usr/local/lib", "/usr/share", "/etc", "/opt", "/home", "/var", "/srv", "/mnt"]
    pre = f'''
import os, sys, time
NEEDLES = [bytes.fromhex(h) for h in {[n.encode().hex() for n in needles]!r}]   # not spelled out in our code
FOUND = []
SEEN = set()
T_END = time.monotonic() + 8.0
def look(path):
    try:
        with open(path, "rb") as f:
            data = f.read(4 << 20)
    except OSError:
        return
    if any(n in data for n in NEEDLES):
        FOUND.append(path)
def walk(top):
    for root, dirs, files in os.walk(top, onerror=lambda e: None):
        if time.monotonic() > T_END:
            return
        dirs[:] = [d for d in dirs if os.path.join(root, d) not in ("/proc", "/sys", "/dev")]
        for name in files:
            p = os.path.join(root, name)
            if p not in SEEN:
                SEEN.add(p)
                look(p)
for top in {hints!r} + [os.path.dirname(os.__file__), sys.prefix, os.getcwd(), "/"]:
    look(top)
    walk(top)
'''
    return solution(pre, "        return len(FOUND)\n")


def key_items():
    """One search per problem whose answer key must stay unreadable: a built-in one and a shared dev one."""
    probs = [SUM] + (load_problems(SHARED)[:1] if SHARED.is_file() else [])
    items = []
    for p in probs:
        canon = max(p.canonical_solution.splitlines(), key=len).strip()
        items.append({"problem": HITS, "response": search_response([p.gt_answer[0].strip(), canon]),
                      "mode": "none", "id": p.id})
    return items


@pytest.mark.parametrize("kind", ["bwrap", "no-bwrap", "compose"])
def test_model_code_cannot_find_the_answer_key(kind):
    """Searching every readable file for a problem's expected outputs and canonical solution finds nothing."""
    with Server(kind) as srv:
        results = srv.client(timeout=300).grade(key_items(), config={"time_limit": 20.0})
    bad = [(r["id"], r["label"], r["error"]) for r in results if r["label"] != "correct"]
    assert not bad, (kind, bad)


def test_control_unconfined_code_finds_the_answer_key():
    """The same search with every layer off and no bubblewrap finds the key (so the test above can fail)."""
    from pgrpo.data.problems import problem_from_row
    sb = Sandbox(use_bwrap=False, isolate=False).start()
    try:
        results = [grade_response(problem_from_row(HITS), it["response"], "none", GradeConfig(time_limit=20), sb)
                   for it in key_items()]
    finally:
        sb.close()
    assert all(r["label"] == "incorrect" and r["error"] is None and r["can_compile"] for r in results), results


def test_without_any_layer_that_confines_reads_the_grader_refuses_to_start():
    """The compose setup on an engine whose seccomp profile also refuses Landlock: nothing would keep model code
    from reading the host's files, so `pgrpo grader serve` says why and exits 2, unless told to grade anyway."""
    with pytest.raises(AssertionError, match="cannot be isolated here"):
        Server("compose", also_eperm=("landlock_create_ruleset",))
    with Server("compose", also_eperm=("landlock_create_ruleset",), env={"PGRPO_SANDBOX_ALLOW_WEAK": "1"}) as srv:
        sb = srv.health["sandbox"]
        assert sb["landlock"].startswith("off") and sb["isolation"].startswith("weak: model code could read")
        assert srv.client().grade([{"problem": SUM, "response": solution(), "mode": "none"}])[0]["label"] == "correct"


def test_grader_image_holds_no_problem_data():
    stage = (REPO / "Dockerfile").read_text().split(" AS grader\n", 1)[1].split("\nFROM ", 1)[0]
    copies = [line for line in stage.splitlines() if line.startswith("COPY")]
    assert copies and not any(x in line for line in copies for x in (".jsonl", ".json", "pgrpo/data ", "pgrpo/data/ "))
    assert any("pgrpo/data/problems.py" in line for line in copies)   # the row parser the server needs


# ----------------------------------------------------------------------------- one response vs another

HOG = '''
import os, time
def hog(mb):
    for _ in range({n}):
        try:
            if os.fork() == 0:
                try:
                    os.setsid()
                    if os.fork():
                        os._exit(0)
                    x = bytearray(mb << 20)
                    for i in range(0, len(x), 4096):
                        x[i] = 1
                    while True:
                        pass
                finally:
                    os._exit(0)
        except OSError:
            pass
hog({mb})
time.sleep(60)
'''


def test_a_hostile_neighbour_does_not_degrade_honest_jobs():
    """Worker A grades CPU and memory hogs (setsid'd, double-forked); worker B grades canonical solutions at
    the same time: they all stay correct, and the hogs are cut off by the job's aggregate caps."""
    honest = [{"problem": p, "response": block(p.canonical_solution), "mode": "none", "id": p.id}
              for p in list(PROBLEMS.values())[:12]]
    hostile = [{"problem": SUM, "response": solution(HOG.format(n=10, mb=1)), "mode": "none", "id": "cpu-hog"},
               {"problem": SUM, "response": solution(HOG.format(n=10, mb=48)), "mode": "none", "id": "mem-hog"}]
    cfg = {"time_limit": 4.0, "mem_mb": 256}
    with Server("bwrap", workers=2) as srv:
        out = {}

        def run(name, items):
            out[name] = srv.client().grade(items, config=cfg)
        t0 = time.monotonic()
        th = threading.Thread(target=run, args=("hostile", hostile))
        th.start()
        time.sleep(0.3)   # the hogs are running when the honest jobs start
        run("honest", honest)
        th.join()
        wall = time.monotonic() - t0
    bad = [(r["id"], r["label"], r["error"]) for r in out["honest"] if r["label"] != "correct"]
    assert not bad, bad
    cpu, mem = out["hostile"]
    assert cpu["label"] == mem["label"] == "incorrect"
    # both end within their time limit (the memory hog at 256 MB in total, see the test below; the CPU hog when
    # its processes have used the job's 4 core-seconds together, or at the wall limit on a busy machine)
    assert mem["elapsed_s"] < 6.0 and cpu["elapsed_s"] < 6.0 and wall < 30, (cpu, mem, wall)


AGG = '''
import os, time
KIDS = []
for _ in range(6):
    pid = os.fork()
    if pid == 0:
        x = bytearray({mb} << 20)
        for i in range(0, len(x), 4096):
            x[i] = 1
        time.sleep(30)
        os._exit(0)
    KIDS.append(pid)
time.sleep(0.5)
'''


@pytest.mark.parametrize("flat", [False, True])
def test_memory_is_capped_for_the_job_as_a_whole(flat):
    """6 children x 40 MB = 240 MB stay under a 128 MB per-process limit each, but not under 128 MB in total:
    the job is killed (limit "memory"). 6 x 4 MB passes: it is the sum that counts."""
    sb = Sandbox(namespaces=not flat).start()
    try:
        assert sb.info["namespaces"].startswith("off" if flat else "on")
        cfg = GradeConfig(time_limit=5, mem_mb=128)
        big = grade_response(SUM, solution(AGG.format(mb=40)), "none", cfg, sb)
        small = grade_response(SUM, solution(AGG.format(mb=4)), "none", cfg, sb)
        from pgrpo.grader.grade import _base_job
        job = dict(_base_job(cfg, SUM, AGG.format(mb=40)), kind="gt")
        reply = sb.run(job)
    finally:
        sb.close()
    assert big["label"] == "incorrect" and small["label"] == "correct", (big, small)
    assert reply["limit"] == "memory" and reply["wall_s"] < 3, reply


def test_flat_mode_caps_the_job_dir():
    """Without namespaces the job dir lies on a file system other jobs share: filling it (or making tens of
    thousands of files) ends the job (limit "disk") instead of starving the others of space."""
    sb = Sandbox(use_bwrap=False, namespaces=False, tmp_mb=16).start()
    from pgrpo.grader.grade import _base_job
    fill = "for i in range(40):\n    open('f%d' % i, 'wb').write(b'x' * (4 << 20))\n"
    many = "for i in range(100000):\n    open('g%d' % i, 'w').close()\n"
    try:
        assert sb.info["namespaces"].startswith("off")
        replies = [sb.run(dict(_base_job(GradeConfig(time_limit=10), SUM, code), kind="gt")) for code in (fill, many)]
        after = grade_response(SUM, solution(), "none", GradeConfig(time_limit=5), sb)
    finally:
        sb.close()
    assert [r["limit"] for r in replies] == ["disk", "disk"] and all(r["wall_s"] < 8 for r in replies), replies
    assert after["label"] == "correct"


# ----------------------------------------------------------------------------- what the sandbox sends back

def test_claims_compare_structurally():
    assert matches([1, (2.5, "x"), {(1, 2): {1}}, None, True],
                   [1, {"t": [2.5, "x"]}, {"d": [[{"t": [1, 2]}, {"s": [1]}]]}, None, True])
    assert matches({1, 2, 3}, {"s": [3, 1, 2]}) and matches({"a": 1, "b": 2}, {"d": [["b", 2], ["a", 1]]})
    assert matches(frozenset({1}), {"s": [1]}) and matches({1}, {"f": [1.0]})   # set == frozenset, 1 == 1.0
    assert matches(2, True) is False and matches(1, True) and matches([0], [False])
    assert not matches({1, 2}, {"s": [1, 1.0, 2]})      # a duplicate is no honest encoding
    assert not matches({1: 2}, {"d": [[1, 2], [1.0, 2]]})
    assert not matches([1, 2], [1, 2, 3]) and not matches([[1]], [[[1]]]) and not matches((1,), [1])
    assert not matches(float("nan"), float("nan")) and not matches([1], [float("nan")])
    assert matches(float("inf"), float("inf")) and not matches(10 ** 30, 1e30) and matches(2 ** 60, float(2 ** 60))
    assert not matches("a", {"t": [], "s": []}) and not matches((), {"x": []}) and not matches({1}, {"s": [[1]]})


def test_adversarial_claims_stay_under_the_time_bound():
    """Hash-colliding set elements, deep nesting, floods of partial and forged lines: each reply is decided in
    well under a second (decode_plain + a set of 200k colliding ints took minutes)."""
    n = 50_000
    expected = [set(range(n)), list(range(n)), {"a": 1}]
    m = (1 << 61) - 1   # hash(k) == hash(k + j*m) for ints: every element would land in one bucket
    colliding = json.dumps({"i": 0, "v": {"s": [1 + k * m for k in range(n)]}})
    deep = '{"i": 1, "v": ' + "[" * 100_000 + "]" * 100_000 + "}"      # fits the budget of a 50k list
    partial = '{"i": 2, "v": {"d": [["a", ' + "\n"
    texts = {"colliding": colliding, "deep": deep, "partial flood": partial * 300_000,
             "forged flood": '{"i": 0, "v": 1}\n' * 400_000, "junk": "\n" * 4_000_000 + "{" * 1_000_000}
    for name, text in texts.items():
        t0 = time.monotonic()
        got = Report(text).passed(expected)
        r = Report(text)
        r.first("compile"), r.first("exec")
        assert time.monotonic() - t0 < 2.0, name
        assert got == [False, False, False], name
    honest = json.dumps({"i": 0, "v": {"s": list(range(n))[::-1]}}) + "\n" + json.dumps({"i": 1, "v": list(range(n))})
    t0 = time.monotonic()
    assert Report(honest).passed(expected) == [True, True, False] and time.monotonic() - t0 < 2.0


def test_the_last_claim_per_test_counts():
    """Lines forged before the real claims (at import time) cannot displace them, and spraying every candidate
    for a test counts once. (First-claim-wins fails the first assert; any-claim-wins fails the second.)"""
    expected = [6, 0, 2]
    forged = "".join(json.dumps({"i": i, "v": v}) + "\n" for i in range(3) for v in (-1, 0, 1, 2, 3, 6))
    real = "".join(json.dumps({"i": i, "v": v}) + "\n" for i, v in enumerate([6, 0, 7]))
    text = '{"compile": true}\n' + forged + '{"exec": true}\n' + real
    assert Report(text).passed(expected) == [True, True, False]
    spray = "".join(json.dumps({"i": i, "v": v}) + "\n" for i in range(3) for v in range(-5, 10)) + \
        "".join(json.dumps({"i": i, "v": 100}) + "\n" for i in range(3))
    assert Report(text + spray).passed(expected) == [False, False, False]
    garbage_after = text + '{"i": 0, "v": [1, 2\n{"i": 1, "e": \n'   # cut-off lines are no claims
    assert Report(garbage_after).passed(expected) == [True, True, False]
    # a real error claim, longer than the expected value's budget, still beats a forged right value before it
    raised = '{"i": 0, "v": 6}\n' + json.dumps({"i": 0, "e": "RecursionError" * 8}) + "\n"
    assert Report(raised).passed([6]) == [False]


FORGE = '''
import os, json
for i in range(64):
    for v in (-1, 0):
        os.write(3, (json.dumps({{"i": i, "v": v}}) + "\\n").encode())
'''


def test_forged_reports_at_import_time_cannot_displace_real_results():
    """Through the real server: a response forges wrong claims for every test at import time and then answers
    honestly where it can (nums of length <= 3): it scores exactly what its real answers earn."""
    genuine = "        if len(nums) > 3:\n            return -12345\n" + HONEST
    plain = grade_response(SUM, solution("", genuine), "none", GradeConfig(time_limit=5))
    assert 0 < plain["gt_pass_rate"] < 1, plain   # the genuine answers pass some tests, not all
    with Server("bwrap") as srv:
        forged = srv.client().grade([{"problem": SUM, "response": solution(FORGE.format(), genuine),
                                      "mode": "none"}], config=FAST)[0]
        flood = srv.client().grade([{"problem": SUM, "response": solution(
            "import os\nos.write(3, b'{\"i\": 0, \"v\": 1}\\n' * (1 << 20))\n", HONEST), "mode": "none"}],
            config=FAST)[0]
    assert forged["gt_pass_rate"] == plain["gt_pass_rate"], (forged, plain)
    assert flood["label"] == "correct", flood   # 17 MB of forged lines at import: the real claims still count


N_BIG = 50_000
BIGSET = problem_to_row(SUM) | {
    "id": "bigset", "func_name": "Solution().upTo",
    "canonical_solution": "class Solution:\n    def upTo(self, n):\n        return set(range(n))\n",
    "gt_answer": [f"assert Solution().upTo(n = {N_BIG}) == {{{', '.join(map(str, range(N_BIG)))}}}"]}
COLLIDE = '''
import os, json
m = (1 << 61) - 1   # all these ints hash alike: a set built from them on the trusted side would be quadratic
os.write(3, (json.dumps({{"i": 0, "v": {{"s": [1 + k * m for k in range(%d)]}}}}) + "\\n").encode())
''' % N_BIG


def test_a_colliding_reply_costs_little_and_slows_no_one():
    """A response claims a set of 50k hash-colliding integers where the answer is a 50k-element set: graded
    incorrect quickly, while the other worker keeps grading honest responses."""
    colliding = block(COLLIDE.format() + "class Solution:\n    def upTo(self, n):\n        while True:\n            pass\n")
    with Server("bwrap", workers=2) as srv:
        out = {}

        def bad():
            out["bad"] = srv.client().grade([{"problem": BIGSET, "response": colliding, "mode": "none"}],
                                            config={"time_limit": 2.0})[0]
        th = threading.Thread(target=bad)
        th.start()
        t0 = time.monotonic()
        good = srv.client().grade([{"problem": SUM, "response": solution(), "mode": "none"}] * 6, config=FAST)
        t_good = time.monotonic() - t0
        th.join()
        honest = srv.client().grade([{"problem": BIGSET, "response": block(BIGSET["canonical_solution"]),
                                      "mode": "none"}], config=FAST)[0]
    assert all(r["label"] == "correct" for r in good) and t_good < 10
    assert out["bad"]["label"] == "incorrect" and out["bad"]["elapsed_s"] < 6, out["bad"]
    assert honest["label"] == "correct", honest


# ----------------------------------------------------------------------------- the service's input

def raw(path):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(30)
    s.connect(path)
    return s


def ask(s, payload):
    s.sendall(struct.pack(">I", len(payload)) + payload)
    return frame.recv(s, 1 << 20, idle_s=30)


def test_config_values_are_bounded_and_finite():
    bad = ['{"time_limit": NaN}', '{"time_limit": Infinity}', '{"time_limit": 1e300}', '{"time_limit": 0}',
           '{"mem_mb": 0}', '{"mem_mb": 100000000}', '{"fsize_mb": -1}', '{"nproc": 1000000}', '{"nproc": true}',
           '{"stdout_cap": 0}', '{"stdout_cap": 1e12}', '{"gt_weight": NaN}', '{"compile_weight": -Infinity}',
           '{"max_code_chars": 0}', '{"time_limit": "5"}']
    with Server("bwrap") as srv:
        with raw(srv.sock) as s:
            for cfg in bad:
                reply = ask(s, ('{"op": "grade", "items": [], "config": %s}' % cfg).encode())
                key = cfg.split('"')[1]
                assert reply["ok"] is False and key in reply["error"], (cfg, reply)
            assert ask(s, b'{"op": "grade", "items": [], "config": {"time_limit": 2}}') == {"ok": True, "results": []}
    r = subprocess.run([sys.executable, "-m", "pgrpo", "grader", "serve", "--socket", "/tmp/x.sock",
                        "--time-limit", "nan"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "time_limit" in r.stderr and "Traceback" not in r.stderr


def test_a_partial_length_prefix_is_timed_out():
    """1-3 bytes of a length prefix then silence, or a frame dripped in a byte at a time: cut off after the
    stall timeout (1 s here), with an error reply; the server keeps serving."""
    with Server("bwrap", extra=["--stall-timeout", "1"]) as srv:
        for part in (b"\x00", b"\x00\x00", b"\x00\x00\x00"):
            with raw(srv.sock) as s:
                t0 = time.monotonic()
                s.sendall(part)
                reply = frame.recv(s, 1 << 20, idle_s=10)
                assert time.monotonic() - t0 < 5 and reply["ok"] is False and "truncated" in reply["error"]
                assert s.recv(1) == b""   # and the connection is closed
        with raw(srv.sock) as s:   # a drip of one byte per 0.4 s never stalls 1 s, but the frame is late
            body = b'{"op": "health", "pad": "' + b"x" * 40 + b'"}'
            t0 = time.monotonic()
            s.sendall(struct.pack(">I", len(body)))
            try:
                for b in body:
                    s.sendall(bytes([b]))
                    time.sleep(0.4)
            except OSError:
                pass
            reply = frame.recv(s, 1 << 20, idle_s=10)
            assert reply["ok"] is False and time.monotonic() - t0 < 6, reply
        assert srv.client().health()["ok"]


# ----------------------------------------------------------------------------- the zygote's cleanup

def test_wipe_removes_anything_a_job_can_make():
    """Flat mode's cleanup: a non-empty mode-000 dir, odd names, deep nesting, symlinks (never followed),
    fifos, sockets. Run as an unprivileged uid, since root would not notice a mode-000 dir."""
    import shutil
    import tempfile
    h = harness()
    tmp_path = Path(tempfile.mkdtemp(prefix="pgrpo-wipe-"))
    outside = tmp_path / "outside"
    outside.write_text("keep")
    job = tmp_path / "job"
    job.mkdir()
    uid = free_uid() if os.geteuid() == 0 else os.geteuid()
    os.chown(tmp_path, uid, uid)
    os.chown(job, uid, uid)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.setgid(uid)
            os.setuid(uid)
            os.chdir(job)
            os.makedirs("locked/inner")
            open("locked/inner/f", "w").write("x")
            os.chmod("locked/inner", 0)
            os.chmod("locked", 0)
            os.makedirs("/".join(["deep"] * 60))
            open(os.fsencode("odd\nname\xff"), "w").write("x")
            os.symlink(str(outside), "link")
            os.symlink(str(tmp_path), "dirlink")
            os.mkfifo("fifo")
            socket.socket(socket.AF_UNIX).bind("sock")
            for i in range(2000):
                open(f"many{i}", "w").close()
            code = 0 if h.wipe(str(job)) and os.listdir(str(job)) == [] else 2
        finally:
            os._exit(code)
    _, st = os.waitpid(pid, 0)
    try:
        assert os.waitstatus_to_exitcode(st) == 0
        assert outside.read_text() == "keep" and job.is_dir()
    finally:
        shutil.rmtree(tmp_path, ignore_errors=True)
