"""Trainer side of the grader: a socket client with timeouts and retries, and LocalGrader, which runs the
server as a child process (`python -m pgrpo grader serve`) when no sidecar container is around."""
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, is_dataclass

from pgrpo.errors import UserError
from pgrpo.grader import frame

MAX_REPLY = 512 << 20


class GraderError(Exception):
    """The grader answered {"ok": false} (a bad request) or could not be reached after all retries."""


def _row(problem):
    if isinstance(problem, dict):
        return problem
    from pgrpo.data.problems import problem_to_row
    return problem_to_row(problem)


class GraderClient:
    """`grade(items)` -> one result dict per item, in order. items: dicts with "problem" (a Problem or a
    jsonl row), "response", optional "mode" and "id". Connection failures and timeouts are retried
    `retries` times with backoff (grading is idempotent); an {"ok": false} reply raises GraderError."""

    def __init__(self, socket_path, timeout=900.0, retries=2, backoff=0.5, connect_timeout=10.0,
                 on_outcome=None):
        self.socket_path = socket_path
        self.on_outcome = on_outcome   # e.g. metrics.grader_request: called with ok|error|retry|timeout
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.connect_timeout = connect_timeout
        self.stats = {"ok": 0, "error": 0, "retry": 0, "timeout": 0}   # pgrpo_grader_requests_total outcomes

    def _count(self, outcome):
        self.stats[outcome] += 1
        if self.on_outcome is not None:
            self.on_outcome(outcome)

    def _call_once(self, req):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(self.connect_timeout)
            s.connect(self.socket_path)
            s.settimeout(self.timeout)
            frame.send(s, req)
            # the whole request may take `timeout` to grade; once the reply starts it must keep coming
            reply = frame.recv(s, MAX_REPLY, idle_s=self.timeout, stall_s=min(self.timeout, 60.0), what="reply",
                               idle_raises=True)
            if reply is None:
                raise ConnectionError("grader closed the connection without a reply")
            if type(reply) is not dict:
                raise ConnectionError("grader reply is not a JSON object")
            return reply

    def call(self, req):
        last = None
        for attempt in range(self.retries + 1):
            if attempt:
                self._count("retry")
                time.sleep(self.backoff * (2 ** (attempt - 1)))
            try:
                reply = self._call_once(req)
            except socket.timeout as e:
                self._count("timeout")
                last = e
                continue
            except (OSError, frame.FrameError) as e:
                last = e
                continue
            if not reply.get("ok"):
                self._count("error")
                raise GraderError(str(reply.get("error", "grader refused the request")))
            self._count("ok")
            return reply
        self._count("error")
        raise GraderError(f"grader at {self.socket_path} unreachable after {self.retries + 1} tries: "
                          f"{type(last).__name__}: {last}")

    def health(self):
        return self.call({"op": "health"})

    def grade(self, items, config=None):
        req = {"op": "grade", "items": [dict(it, problem=_row(it["problem"])) for it in items]}
        if config is not None:
            req["config"] = asdict(config) if is_dataclass(config) else dict(config)
        results = self.call(req)["results"]
        if len(results) != len(items):
            raise GraderError(f"grader returned {len(results)} results for {len(items)} items")
        return results


class LocalGrader:
    """Context manager: a grader server child process on a private temp socket.

        with LocalGrader(workers=2) as g:
            results = g.client().grade(items)
    """

    def __init__(self, workers=2, socket_path=None, time_limit=None, startup_timeout=60.0, extra_args=()):
        self.workers = workers
        self.socket_path = socket_path
        self.time_limit = time_limit
        self.startup_timeout = startup_timeout
        self.extra_args = list(extra_args)
        self.proc = None
        self._tmp = None
        self._log = None
        self._lifeline = None

    def start(self):
        if self.socket_path is None:
            self._tmp = tempfile.mkdtemp(prefix="pgrpo-grader-")
            self.socket_path = os.path.join(self._tmp, "grader.sock")
        elif self._tmp is not None:   # restart: the stopped child removed its temp dir on the way out
            os.makedirs(self._tmp, mode=0o700, exist_ok=True)
        log_dir = self._tmp or tempfile.gettempdir()
        self._log_path = os.path.join(log_dir, f"grader-{os.getpid()}-{id(self)}.log")
        self._log = open(self._log_path, "w+b")
        # the child watches the read end of this pipe: when we die (even by SIGKILL) the kernel closes our write
        # end, the child reads EOF and stops at once, removing its queue, sandboxes and our temp dir
        r, self._lifeline = os.pipe()
        argv = [sys.executable, "-m", "pgrpo", "grader", "serve", "--socket", self.socket_path,
                "--workers", str(self.workers), "--exit-with-parent", "--parent-fd", str(r)] + self.extra_args
        if self._tmp:
            argv += ["--cleanup-dir", self._tmp]
        if self.time_limit is not None:
            argv += ["--time-limit", str(self.time_limit)]
        try:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=self._log, stderr=self._log,
                                         start_new_session=True, pass_fds=(r,))
        finally:
            os.close(r)
        deadline = time.monotonic() + self.startup_timeout
        probe = GraderClient(self.socket_path, timeout=10.0, retries=0)
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise UserError(f"the grader server exited during startup: {self.log_tail()}")
            try:
                probe.health()
                return self
            except GraderError:
                time.sleep(0.1)
        self.stop()
        raise UserError(f"the grader server did not become healthy in {self.startup_timeout:g}s.")

    def log_tail(self, n=2000):
        try:
            self._log.flush()
            with open(self._log_path, "rb") as f:
                return f.read()[-n:].decode("utf-8", "replace").strip()
        except (OSError, AttributeError):
            return ""

    def client(self, **kw):
        return GraderClient(self.socket_path, **kw)

    def alive(self):
        if self.proc is None or self.proc.poll() is not None:
            return False
        try:
            return bool(GraderClient(self.socket_path, timeout=10.0, retries=0).health().get("ok"))
        except GraderError:
            return False

    def stop(self):
        """Stop the child within a second or two: closing the lifeline is the parent-died path (queue dropped,
        sandboxes killed, exit without waiting for items in flight: only we wanted their answers)."""
        if self._lifeline is not None:
            os.close(self._lifeline)
            self._lifeline = None
        if self.proc is not None:
            if self.proc.poll() is None:
                try:
                    self.proc.wait(timeout=5)
                except subprocess.TimeoutExpired:   # an old server without --parent-fd: ask, then insist
                    self.proc.send_signal(signal.SIGTERM)
                    try:
                        self.proc.wait(timeout=15)
                    except subprocess.TimeoutExpired:
                        os.killpg(self.proc.pid, signal.SIGKILL)
                        self.proc.wait()
            self.proc = None
        if self._log is not None:
            self._log.close()
            self._log = None
            try:
                os.unlink(self._log_path)
            except OSError:
                pass

    def restart(self):
        self.stop()
        if self._tmp is None and os.path.exists(self.socket_path):
            os.unlink(self.socket_path)
        return self.start()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None
            self.socket_path = None
        return False


class GraderLink:
    """The trainer's side of the grader: a client on `socket_path` (a sidecar), or a LocalGrader child process
    this link owns (started here, stopped by `close()`). A failed request is retried with backoff; a local grader
    that died is restarted first, so a crash of the sandbox service costs a retry, not the run. Every attempt is
    reported to `on_outcome(ok|error|retry|timeout)` (the trainer counts them in pgrpo_grader_requests_total)."""

    RETRIES = 4

    def __init__(self, socket_path=None, workers=2, time_limit=5.0, request_items=1, on_outcome=None):
        self.on_outcome = on_outcome or (lambda outcome: None)
        self.local = None
        self.grade_config = {"time_limit": time_limit}
        # a whole request (request_items completions over `workers` sandboxes) may take many time limits
        self.timeout = max(120.0, 2 * time_limit * request_items)
        self.socket_path = socket_path
        if socket_path is not None and not os.path.isdir(os.path.dirname(os.path.abspath(socket_path))):
            raise UserError(f"grader_socket {socket_path}: directory {os.path.dirname(os.path.abspath(socket_path))} "
                            f"does not exist (mount the grader's socket volume there, or leave grader_socket unset).")
        if socket_path is None:
            self.local = LocalGrader(workers=workers, time_limit=time_limit)
            self.local.start()
            self.socket_path = self.local.socket_path
        self.client = self._client()
        self._wait_healthy()

    def _wait_healthy(self, wait_s: float = 120.0):
        """A sidecar grader may still be starting (compose starts both at once): poll its health for a while."""
        deadline, said = time.monotonic() + wait_s, False
        while True:
            try:
                return self.client.health()
            except GraderError as e:
                if time.monotonic() > deadline:
                    raise UserError(f"no healthy grader at {self.socket_path} after {wait_s:g}s ({e}); "
                                    f"start one with `pgrpo grader serve --socket {self.socket_path}` "
                                    f"or leave grader_socket unset for a local one.") from None
                if not said:
                    print(f"grader: waiting for {self.socket_path} ...", flush=True)
                    said = True
                time.sleep(1.0)

    def _client(self):
        return GraderClient(self.socket_path, timeout=self.timeout, retries=0)  # retries happen here, counted

    @property
    def pid(self):
        return self.local.proc.pid if self.local is not None and self.local.proc is not None else None

    def grade(self, items):
        for attempt in range(self.RETRIES + 1):
            timeouts = self.client.stats["timeout"]
            try:
                results = self.client.grade(items, config=self.grade_config)
                self.on_outcome("ok")
                return results
            except GraderError as e:
                self.on_outcome("timeout" if self.client.stats["timeout"] > timeouts else "error")
                if attempt == self.RETRIES:
                    raise UserError(f"the grader failed {self.RETRIES + 1} times in a row ({e}); giving up.") from None
                self.on_outcome("retry")
                print(f"grader: request failed ({e}); retrying", flush=True)
                if self.local is not None and not self.local.alive():
                    self.local.restart()
                    self.client = self._client()
                    print(f"grader: restarted local grader (pid {self.pid})", flush=True)
                else:
                    time.sleep(min(2 ** attempt, 10))
                    if self.local is None:   # a sidecar that went down comes back through its restart policy
                        self._wait_healthy()

    def close(self):
        if self.local is not None:
            self.local.__exit__(None, None, None)
            self.local = None
