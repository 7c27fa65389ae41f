"""`pgrpo grader serve --socket PATH [--workers N]`: the long-lived grading service.

Wire protocol (Unix stream socket, any number of requests per connection): each message is a 4-byte
big-endian length followed by that many bytes of UTF-8 JSON.
  {"op": "health"}                                  -> {"ok": true, "workers": N, "alive": k, ...}
  {"op": "grade", "items": [{"problem": <jsonl row>, "response": str, "mode": str, "id": any}, ...],
   "config": {<GradeConfig overrides>}}             -> {"ok": true, "results": [<result>, ...]} (in order)
  anything wrong                                    -> {"ok": false, "error": "one sentence"}
Malformed JSON, unknown ops and invalid items (config values out of bounds, NaN or Infinity included) get an
error reply and the connection stays usable. An oversized length prefix, or a frame cut short (EOF, or a stall
of --stall-timeout seconds, default 30, anywhere after its first byte: 1-3 bytes of a length prefix count),
gets an error reply and that connection is closed (the stream cannot be re-synchronised); the server keeps
serving everyone else. The frame code lives in frame.py.

Workers: N threads, each owning one sandboxed zygote (sandbox.py). Items of all requests go through one
queue, so a batch is graded in parallel across workers. If a zygote dies or hangs mid-item (killed, OOM,
a response that kills it) the worker starts a new one and retries the item once; if that fails too, the
item is answered as a failure with `error` set. No item is ever dropped.
"""
import argparse
import os
import queue
import signal
import socket
import socketserver
import sys
import threading
import time

from pgrpo.data import prompts
from pgrpo.data.problems import problem_from_row
from pgrpo.errors import UserError
from pgrpo.grader import frame
from pgrpo.grader.frame import FrameError
from pgrpo.grader.grade import GradeConfig, error_result, grade_response
from pgrpo.grader.sandbox import Sandbox, SandboxError

DEFAULT_MAX_REQUEST = 64 << 20
FRAME_STALL_S = 30.0
IDLE_S = 3600.0


class _Batch:
    def __init__(self, n):
        self.results = [None] * n
        self.left = n
        self.lock = threading.Lock()
        self.done = threading.Event()
        if n == 0:
            self.done.set()

    def put(self, i, res):
        with self.lock:
            if self.results[i] is None:
                self.results[i] = res
                self.left -= 1
                if self.left == 0:
                    self.done.set()


class Worker(threading.Thread):
    def __init__(self, server, slot):
        super().__init__(daemon=True, name=f"grader-worker-{slot}")
        self.server, self.slot = server, slot
        self.sandbox = Sandbox(slot=slot, use_bwrap=server.use_bwrap)
        self.restarts = 0

    def ensure(self):
        if not self.sandbox.alive():
            self.sandbox.start()
            self.restarts += 1

    def run(self):
        q = self.server.queue
        while True:
            task = q.get()
            if task is None:
                self.sandbox.close()
                return
            batch, i, problem, response, mode, item_id, cfg = task
            res = None
            for attempt in range(2):
                try:
                    self.ensure()
                    res = grade_response(problem, response, mode, cfg, self.sandbox, item_id=item_id)
                    break
                except SandboxError as e:
                    self.sandbox.kill()
                    self.server.count("sandbox_failures")
                    err = f"sandbox failed twice on this item ({e})"
                except Exception as e:   # a grader bug must not drop the item or kill the worker
                    self.sandbox.kill()
                    err = f"grader error: {type(e).__name__}: {e}"
                    break
            if res is None:
                res = error_result(item_id, problem.id, mode, err)
            batch.put(i, res)
            self.server.count("graded")


class GraderServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, path, workers=2, max_request=DEFAULT_MAX_REQUEST, use_bwrap="auto", config=None,
                 stall_s=FRAME_STALL_S):
        self.path = path
        self.max_request = max_request
        self.stall_s = stall_s
        self.use_bwrap = use_bwrap
        self.config = config or GradeConfig()
        self.queue = queue.Queue()
        self.counters = {"requests": 0, "graded": 0, "errors": 0, "sandbox_failures": 0}
        self._clock = threading.Lock()
        self.started = time.time()
        if os.path.exists(path):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(path)
                raise UserError(f"another grader is already serving on {path}")
            except (ConnectionRefusedError, FileNotFoundError):
                os.unlink(path)
            finally:
                s.close()
        super().__init__(path, _Handler)
        os.chmod(path, 0o666)   # the trainer may run as another uid on the shared volume
        self.workers = [Worker(self, i) for i in range(workers)]
        try:
            for w in self.workers:
                w.sandbox.start()   # fail fast if the sandbox cannot start at all
        except BaseException:
            for w in self.workers:
                w.sandbox.close()
            self.server_close()
            os.unlink(path)
            raise
        for w in self.workers:
            w.start()

    def count(self, key, n=1):
        with self._clock:
            self.counters[key] = self.counters.get(key, 0) + n

    def health(self):
        info = self.workers[0].sandbox.info if self.workers else {}
        return {"ok": True, "workers": len(self.workers),
                "alive": sum(w.sandbox.alive() for w in self.workers),
                "sandbox_pids": [getattr(w.sandbox.proc, "pid", None) for w in self.workers],
                "restarts": sum(max(0, w.restarts) for w in self.workers),
                "sandbox": {k: info.get(k) for k in ("bwrap", "uid", "python", "python_version", "seccomp",
                                                      "landlock", "namespaces", "isolation")},
                "queue": self.queue.qsize(), "uptime_s": round(time.time() - self.started, 1),
                "pid": os.getpid(), "config": self.config.to_dict(), **self.counters}

    def handle_request_obj(self, req):
        if type(req) is not dict:
            return {"ok": False, "error": "request must be a JSON object"}
        op = req.get("op")
        if op == "health":
            return self.health()
        if op != "grade":
            return {"ok": False, "error": f"unknown op {op!r}; expected 'grade' or 'health'"}
        items = req.get("items")
        if type(items) is not list:
            return {"ok": False, "error": "'items' must be a list"}
        try:
            cfg = self.config
            if req.get("config") is not None:
                if type(req["config"]) is not dict:
                    raise ValueError("'config' must be an object")
                cfg = GradeConfig.from_dict({**self.config.to_dict(), **req["config"]})
            tasks = []
            for k, it in enumerate(items):
                if type(it) is not dict:
                    raise ValueError(f"item {k} must be an object")
                if type(it.get("response")) is not str:
                    raise ValueError(f"item {k}: 'response' must be a string")
                mode = it.get("mode", "none")
                if mode not in prompts.LOOPHOLE_MODES:
                    raise ValueError(f"item {k}: unknown mode {mode!r}")
                try:
                    problem = problem_from_row(it.get("problem"), where=f"item {k} problem")
                except UserError as e:
                    raise ValueError(str(e)) from None
                tasks.append((problem, it["response"], mode, it.get("id", problem.id)))
        except (ValueError, TypeError) as e:
            return {"ok": False, "error": str(e)}
        batch = _Batch(len(tasks))
        for i, (problem, response, mode, item_id) in enumerate(tasks):
            self.queue.put((batch, i, problem, response, mode, item_id, cfg))
        batch.done.wait()
        return {"ok": True, "results": batch.results}

    def stop(self):
        for _ in self.workers:
            self.queue.put(None)
        for w in self.workers:
            w.join(timeout=10)
            w.sandbox.close()
        try:
            os.unlink(self.path)
        except OSError:
            pass


class _Handler(socketserver.BaseRequestHandler):
    def read_frame(self):
        try:
            return frame.recv(self.request, self.server.max_request, idle_s=IDLE_S, stall_s=self.server.stall_s,
                              what="request")
        except OSError:
            return None

    def handle(self):
        srv = self.server
        while True:
            try:
                req = self.read_frame()
                if req is None:
                    return
                srv.count("requests")
                reply = srv.handle_request_obj(req)
            except FrameError as e:
                srv.count("errors")
                reply = {"ok": False, "error": str(e)}
                try:
                    frame.send(self.request, reply)
                except OSError:
                    return
                if e.fatal:
                    return
                continue
            except Exception as e:   # never let one request take the server down
                srv.count("errors")
                reply = {"ok": False, "error": f"internal error: {type(e).__name__}: {e}"}
            if not reply.get("ok", False):
                srv.count("errors")
            try:
                frame.send(self.request, reply)
            except OSError:
                return


def _parent_gone(srv, cleanup_dir):
    """Our parent died (no one will read our answers): drop the queue, kill every sandbox, remove the socket and
    the temp dir, exit now. No graceful join: a worker mid-item would only finish work nobody wants. A sandbox a
    worker restarts in the meantime reads EOF on its stdin once we are gone and exits too."""
    try:
        while True:
            srv.queue.get_nowait()
    except queue.Empty:
        pass
    for _ in range(2):
        for w in srv.workers:
            try:
                w.sandbox.close()
            except Exception:
                pass
    try:
        os.unlink(srv.path)
    except OSError:
        pass
    if cleanup_dir:
        import shutil
        shutil.rmtree(cleanup_dir, ignore_errors=True)
    os._exit(0)


def cli(argv):
    ap = argparse.ArgumentParser(prog="pgrpo grader", description="grader service")
    sub = ap.add_subparsers(dest="cmd")
    sp = sub.add_parser("serve", help="serve on a Unix socket")
    sp.add_argument("--socket", required=True)
    sp.add_argument("--workers", type=int, default=max(1, os.cpu_count() or 1))
    sp.add_argument("--time-limit", type=float, default=None, help="seconds per problem run (default 10)")
    sp.add_argument("--max-request-mb", type=float, default=DEFAULT_MAX_REQUEST / (1 << 20))
    sp.add_argument("--stall-timeout", type=float, default=FRAME_STALL_S,
                    help="seconds a client may stall inside a request frame before it is cut off (default 30)")
    sp.add_argument("--no-bwrap", action="store_true", help="do not use bubblewrap even if installed")
    sp.add_argument("--exit-with-parent", action="store_true",
                    help="shut down when the process that started us dies (LocalGrader sets this)")
    sp.add_argument("--parent-fd", type=int, default=None,
                    help="read end of a pipe whose write end the parent holds: EOF (the parent died, however) "
                         "stops the server at once (LocalGrader sets this)")
    sp.add_argument("--cleanup-dir", default=None,
                    help="a temp dir to remove when the parent dies (LocalGrader's socket dir)")
    args = ap.parse_args(argv)
    if args.cmd != "serve":
        raise UserError("say `pgrpo grader serve --socket PATH [--workers N]`.")
    if not 1 <= args.workers <= 256:
        raise UserError("--workers must be between 1 and 256.")
    d = os.path.dirname(os.path.abspath(args.socket))
    if not os.path.isdir(d):
        raise UserError(f"socket directory {d} does not exist.")
    cfg = GradeConfig()
    if args.time_limit is not None:
        try:
            cfg = GradeConfig.from_dict({"time_limit": args.time_limit})
        except ValueError as e:
            raise UserError(f"--time-limit: {e}.") from None
    if not 0 < args.max_request_mb <= 4096:   # false for NaN too
        raise UserError("--max-request-mb must be a number in (0, 4096].")
    if not 0 < args.stall_timeout <= 3600:
        raise UserError("--stall-timeout must be a number of seconds in (0, 3600].")
    try:
        srv = GraderServer(args.socket, workers=args.workers, max_request=int(args.max_request_mb * (1 << 20)),
                           use_bwrap=False if args.no_bwrap else "auto", config=cfg, stall_s=args.stall_timeout)
    except SandboxError as e:   # e.g. no isolation possible here: one sentence, exit 2
        raise UserError(f"the grader cannot start its sandbox: {e}") from None

    def stop(signum, frame):
        threading.Thread(target=srv.shutdown, daemon=True).start()
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    if args.parent_fd is not None:   # a trainer killed with SIGKILL must not leave its grader behind
        def watch_pipe():
            try:
                while os.read(args.parent_fd, 4096):
                    pass
            except OSError:
                pass
            _parent_gone(srv, args.cleanup_dir)
        threading.Thread(target=watch_pipe, daemon=True, name="parent-pipe").start()
    if args.exit_with_parent:   # fallback for callers without the pipe: notice re-parenting within a second
        parent = os.getppid()

        def watch():
            while os.getppid() == parent:
                time.sleep(1.0)
            _parent_gone(srv, args.cleanup_dir)
        threading.Thread(target=watch, daemon=True, name="parent-watch").start()
    h = srv.health()
    print(f"pgrpo grader: serving on {args.socket} with {h['workers']} workers "
          f"(bwrap={h['sandbox']['bwrap']}, sandbox uid={h['sandbox']['uid']}, "
          f"python {h['sandbox']['python_version']})", file=sys.stderr, flush=True)
    try:
        srv.serve_forever(poll_interval=0.2)
    finally:
        srv.stop()
        srv.server_close()
    return 0
