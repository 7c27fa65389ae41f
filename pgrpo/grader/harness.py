"""The code that runs INSIDE the sandbox: a zygote that forks a runner and a child per job.

This file is never imported by the grader. `sandbox.py` reads its source and starts it with
`python -I -S -c <source>` (inside bubblewrap when available), so it must stay standard-library only and
self-contained. The zygote imports the modules problem setup code uses once and then never touches job
data: per job it forks a runner (a pristine copy of itself) that reads one job frame from the stdin pipe,
starts the child that runs model code, enforces the wall limit and the job's aggregate CPU and memory,
collects capped outputs and writes the reply. No interpreter start is paid per response.

Nothing a job creates outlives it, by one of two constructions (the zygote probes which one the kernel allows):
- per-job namespaces (`NS`): the runner unshares user, pid, ipc, mount and uts namespaces (and network without
  bwrap) and forks the job's init (pid 1 of the new pid namespace), which forks the child. Everything of the
  job lives in those namespaces and dies with them: when init exits or is killed the kernel kills every
  process of the namespace (setsid daemons, double forks included); SysV IPC and POSIX message queues belong
  to the dead ipc namespace; the user and persistent keyrings to the dead user namespace (and the child joins
  a fresh session keyring); every mount is read-only except a fresh size-capped tmpfs on the job dir, which
  goes away with the mount namespace; the job's /proc shows only its own processes.
- flat (no user namespaces, e.g. a default Docker container): the seccomp filter refuses every syscall that
  makes a kernel object outside the job's processes and files (SysV IPC, message queues, keys, memfds,
  namespaces, file metadata changes, locks, ...), Landlock confines file writes to the job dir, a job may not
  create processes unless the sandbox has its own uid or pid namespace to sweep, and the zygote wipes the job
  dir with a remover that handles any mode, name and file type, or gives up the sandbox if it cannot.
The child installs a seccomp filter as its last step before model code (see `seccomp_program`) and, before
it, Landlock (see `landlock_prepare`): model code reads only the interpreter's own files and its job dir,
writes only its job dir, and cannot signal, ptrace or otherwise reach any process outside its job.

Trust: everything here is UNTRUSTED once model code runs. Model code shares the child process with the
job logic and can rewrite anything in it, including what it reports. That is fine by construction: the
child reports return values (plain data) for test inputs, and only the trusted grader knows the expected
outputs; it compares them outside (claims.py). Reports are claims, never verdicts.

Frames on the zygote's pipes: 4-byte big-endian length + UTF-8 JSON.
Job:   {"kind": "gt"|"check", "code", "setup_code", "tests": [{"fn", "args": [src], "kwargs": {k: src}}],
        "variant": "own"|"arb"|"canon", "mode", "method", "canonical", "test_func": {"form", "parent", "src"}
        or None, "standalone": bool, "time_limit", "mem_mb", "fsize_mb", "nproc", "result_file", "out_cap",
        "sentinel_class", "sentinel_attr", "run_tests_func"}  (check jobs: see "Semantics of a job" below)
Config (first frame): {"workdir", "sweep", "private_dev", "private_net", "tmp_mb", "forbid": [paths],
        "seccomp", "namespaces", "isolate": bools (False only in tests)};
ready frame: {"ready", "pid", "uid", "python", "seccomp", "landlock", "namespaces": "on..." | "off: <why>"}.
Reply: {"status": "ok"|"timeout", "exit": returncode (negative = signal), "limit": None|"cpu"|"memory"|"disk",
        "results": child JSON lines (text: the first RESULT_HEAD and the last RESULT_TAIL bytes),
        "results_truncated", "stdout": head, "stderr": head, "stdout_truncated", "file": result file head or
        None, "wall_s", "cpu_s", "procs"}
"""
import json
import os
import resource
import select
import signal
import stat
import struct
import sys
import time

PREIMPORT = ("typing", "functools", "collections", "itertools", "heapq", "bisect", "string", "operator",
             "math", "random", "datetime", "re", "copy", "ast", "array", "fractions", "decimal",
             "statistics", "sortedcontainers")
RESULT_HEAD = 256 << 10   # bytes of child result lines kept from the start (compile/exec/status lines) ...
RESULT_TAIL = 8 << 20     # ... and from the end (the claims come last: a flood at import cannot push them out)
SECCOMP_INSTALL = None    # set by the zygote when the startup probe saw the filter work
LANDLOCK_FD = None        # the job ruleset (built once by the zygote, applied by each child), if it works
NS = None                 # per-job namespaces: {"flags", "proc", "tmp_mb"} when the startup probe saw them work
ISOLATE = True            # False only in the tests' controls: no per-job layer, no cleanup
DISK_MB = 64              # the job dir's size cap (the per-job tmpfs's size; polled in the flat mode)
BASE_RSS = 0              # resident pages of the zygote, which every forked job process shares copy-on-write
ERR_CAP = 4096
MAX_FRAME = 256 << 20
POLL_S = 0.02             # how often the runner sums the job's CPU and memory
NOFILE = 256              # open files per job process (pipe and socket buffers are memory the rlimits miss)
RULESET_FD = 100          # where the zygote keeps the Landlock ruleset (children close everything else)


# ----------------------------------------------------------------------------- framing
# Its own copy of the frame (the host side's is pgrpo/grader/frame.py): this file runs as `python -I -S -c
# <source>` and imports nothing of the package.

def read_exact(fd, n):
    buf = bytearray()
    while len(buf) < n:
        chunk = os.read(fd, n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


def read_frame(fd):
    head = read_exact(fd, 4)
    if head is None:
        return None
    (n,) = struct.unpack(">I", head)
    if n > MAX_FRAME:
        return None
    body = read_exact(fd, n)
    return None if body is None else json.loads(body.decode("utf-8"))


def write_frame(fd, obj):
    body = json.dumps(obj).encode("utf-8")
    data = struct.pack(">I", len(body)) + body
    view = memoryview(data)
    while view:
        k = os.write(fd, view)
        view = view[k:]


# ----------------------------------------------------------------------------- child side

class NotPlain(Exception):
    pass


def make_encoder(max_nodes=2_000_000, max_chars=16 << 20, max_depth=100):
    """Plain-data encoder with EXACT type checks (`type(x) is int`), so int/str/list subclasses and objects
    with a custom __eq__ are rejected. Tagged JSON: list -> [..], tuple -> {"t": [..]}, dict ->
    {"d": [[k, v], ..]}, set -> {"s": [..]}, frozenset -> {"f": [..]}; None/bool/int/float/str native."""
    import collections
    _type, _len, NoneType = type, len, type(None)
    # stdlib dict subclasses a correct solution often returns; Python equality treats them as dicts.
    # Captured before model code runs, and read through dict.items (never an overridable method).
    dict_like = (dict, collections.Counter, collections.defaultdict, collections.OrderedDict)
    _items = dict.items
    budget = [0, 0]

    def enc(x, depth):
        budget[0] += 1
        if budget[0] > max_nodes or depth > max_depth:
            raise NotPlain("return value too large or too deeply nested")
        t = _type(x)
        if t is NoneType or t is bool or t is float:
            return x
        if t is int:
            if x.bit_length() > 12000:
                raise NotPlain("integer too large")
            return x
        if t is str:
            budget[1] += _len(x)
            if budget[1] > max_chars:
                raise NotPlain("return value too large")
            return x
        if t is list:
            return [enc(e, depth + 1) for e in x]
        if t is tuple:
            return {"t": [enc(e, depth + 1) for e in x]}
        if t is dict or t is dict_like[1] or t is dict_like[2] or t is dict_like[3]:
            return {"d": [[enc(k, depth + 1), enc(v, depth + 1)] for k, v in _items(x)]}
        if t is set:
            return {"s": [enc(e, depth + 1) for e in x]}
        if t is frozenset:
            return {"f": [enc(e, depth + 1) for e in x]}
        raise NotPlain("not plain data: " + t.__name__)

    def encode(x):
        budget[0] = budget[1] = 0
        return enc(x, 0)
    return encode


# Semantics of a job (the benchmark's rules; pgrpo/grader/grade.py decides with what comes back):
# - Model code runs in a fresh namespace WITHOUT `__name__`, like the benchmark's exec(code, {}): the name
#   resolves to the builtins module's ("builtins"), so `if __name__ == "__main__":` blocks do not run.
# - Claims, one JSON line each: {"compile"} before any model code; {"exec": True} or {"exec": False, "e",
#   "fatal"} after the module code (fatal = a BaseException that is not an Exception: SystemExit,
#   KeyboardInterrupt, ... - the benchmark's harness loses its report then, so it reads "cannot compile");
#   the kind's results; {"done": True} at the very end (its absence without a timeout = the program ended
#   the process itself, e.g. os._exit).
#
# Check jobs (kind "check") run the response's mechanism - its test function, the sentinel, the marker -
# three ways: "own" (as written), "arb" (its Solution's graded method returns 0) and "canon" (that method
# is the canonical solution's). The two harm runs must be indistinguishable from the own run for code that
# does not call the graded method, or a response could behave vacuously in one and strictly in another.
# So every variant executes exactly the same steps: same namespace, the canonical code executed (hidden)
# in every variant, the same instrumented module (a hook call after each module-level statement, which
# locates the graded method of whatever `Solution` is bound to), the same call site, and the job dict is
# emptied before model code runs (no frame on the stack holds the variant). The only difference is the
# hook's last act: in a harm run it swaps the graded function's __code__ IN PLACE (same function object,
# class, name, qualname, module, bases, MRO, __dict__ keys; no subclass, so no __init_subclass__ or
# metaclass call; the new code keeps the name, qualname, filename, first line, parameters and closure
# shape). What stays observable is the graded method itself - its bytecode, and whatever calling it shows
# (return values, exceptions, timing): that IS the method under test.
# A harm run whose module stops early still checks the test function: one missing from the namespace (or
# from the class, for the method form) is defined from its source, and a missing or non-class `Solution`
# is bound to the substitute (the canonical class, or the canonical class whose method returns 0) - which
# is the benchmark's harm program. A job with "standalone" runs that program without the module code
# (used when the module never finishes).

_PLACEHOLDER = "\x00pgrpo-target"
_FILENAME = "<solution>"


def _quiet_compile(src, filename, mode="exec"):
    """compile() without the SyntaxWarning a placeholder call `"\\0..."()` gives (the constant is swapped
    for the real callable afterwards)."""
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return compile(src, filename, mode)


def _swap_const(code, old, new):
    return code.replace(co_consts=tuple(new if (type(k) is str and k == old) else k for k in code.co_consts))


def instrument(code, name="Solution"):
    """Compile the response with a placeholder call `"\\0pgrpo-target"()` after each module-level
    statement (inside loops only after statements that mention `name`, so a long module-level loop does not
    pay for it), and at the start of any block whose header mentions `name` (`for Solution in ...`,
    `with ... as Solution`, `if (Solution := ...)`). The caller swaps the placeholder constant for the hook.
    Original statements keep their line numbers; the calls take the line of the statement before them."""
    import ast
    tree = ast.parse(code)

    def mentions(node):
        return any(type(n) is ast.Name and n.id == name for n in ast.walk(node))

    def call(at):
        stmt = ast.Expr(ast.Call(ast.Constant(_PLACEHOLDER), [], []))
        for n in ast.walk(stmt):
            n.lineno = n.end_lineno = getattr(at, "end_lineno", None) or at.lineno
            n.col_offset = n.end_col_offset = 0
        return stmt

    bodies = ("body", "orelse", "finalbody")

    def rewrite(stmts, in_loop, first=False):
        out = []
        for k, s in enumerate(stmts):
            compound = any(getattr(s, f, None) for f in bodies + ("handlers", "cases"))
            if compound and not isinstance(s, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                loop = in_loop or isinstance(s, (ast.For, ast.While, ast.AsyncFor))
                header = [getattr(s, f) for f in s._fields if f not in bodies + ("handlers", "cases")]
                head_hit = any(mentions(h) for h in header if isinstance(h, ast.AST)) or any(
                    mentions(x) for h in header if isinstance(h, list) for x in h if isinstance(x, ast.AST))
                for f in bodies:
                    sub = getattr(s, f, None)
                    if sub:
                        setattr(s, f, ([call(s)] if head_hit else []) + rewrite(sub, loop))
                for h in getattr(s, "handlers", None) or ():
                    h.body = ([call(h)] if h.name == name else []) + rewrite(h.body, loop)
                for c in getattr(s, "cases", None) or ():
                    c.body = ([call(c)] if mentions(c.pattern) else []) + rewrite(c.body, loop)
            out.append(s)
            future = isinstance(s, ast.ImportFrom) and s.module == "__future__"
            docstring = first and k == 0 and isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant) \
                and isinstance(s.value.value, str)
            if not (future or docstring) and (not in_loop or mentions(s)):
                out.append(call(s))
        return out

    tree.body = rewrite(tree.body, False, first=True)
    return _quiet_compile(tree, _FILENAME)


def _params(c):
    """(parameter list source, names) of code object `c`, as its signature was written (no defaults:
    those live on the function object and stay there)."""
    n = c.co_argcount + c.co_kwonlyargcount
    names = c.co_varnames
    pos, kwonly = list(names[:c.co_argcount]), list(names[c.co_argcount:n])
    varargs = names[n] if c.co_flags & 0x04 else None
    varkw = names[n + (1 if varargs else 0)] if c.co_flags & 0x08 else None
    params = []
    for k, p in enumerate(pos):
        params.append(p)
        if k + 1 == c.co_posonlyargcount:
            params.append("/")
    if varargs:
        params.append("*" + varargs)
    elif kwonly:
        params.append("*")
    params += kwonly
    if varkw:
        params.append("**" + varkw)
    return params, pos, kwonly, varargs, varkw


def substitute_code(c, method, target, drop_self):
    """A code object shaped like `c` (name, qualname, filename, first line, parameters, closure cells)
    whose body is `return 0` (target None) or `return target().<method>(<the arguments, minus self>)`."""
    params, pos, kwonly, varargs, varkw = _params(c)
    if target is None:
        ret = "0"
    else:
        fwd = list(pos[1:] if drop_self and pos else pos)
        if varargs:
            fwd.append("*" + varargs + ("[1:]" if drop_self and not pos else ""))
        fwd += ["%s=%s" % (k, k) for k in kwonly]
        if varkw:
            fwd.append("**" + varkw)
        ret = "%r().%s(%s)" % (_PLACEHOLDER, method, ", ".join(fwd))
    fv = c.co_freevars
    src = "def _outer():\n"
    if fv:
        src += "    %s = None\n" % " = ".join(fv)
    src += "    def _f(%s):\n        return %s\n" % (", ".join(params), ret)
    if fv:
        src += "        %s,\n" % ", ".join(fv)   # unreachable; makes the same cells free variables
    src += "    return _f\n"
    outer = _quiet_compile(src, c.co_filename)
    inner = next(k for k in next(k for k in outer.co_consts if hasattr(k, "co_code")).co_consts
                 if hasattr(k, "co_code") and k.co_name == "_f")
    if target is not None:
        inner = _swap_const(inner, _PLACEHOLDER, target)
    kw = {"co_name": c.co_name, "co_firstlineno": c.co_firstlineno}
    if hasattr(c, "co_qualname"):
        kw["co_qualname"] = c.co_qualname
    return inner.replace(**kw)


def locate(obj, method):
    """The plain function behind `obj().<method>` when obj is a class -> (function or None, drop_self,
    found). Reads the real MRO and class dicts (no metaclass __getattribute__, no descriptor __get__);
    follows staticmethod/classmethod/`__wrapped__` (functools.cache & co) to the function inside."""
    import types
    if not issubclass(type(obj), type):
        return None, True, False
    attr, found = None, False
    for klass in type.__dict__["__mro__"].__get__(obj):
        d = type.__dict__["__dict__"].__get__(klass)
        if method in d:
            attr, found = d[method], True
            break
    drop = True
    for _ in range(8):
        t = type(attr)
        if t is types.FunctionType:
            return attr, drop, found
        if t is staticmethod or t is classmethod:
            drop = t is classmethod
            attr = attr.__func__
            continue
        try:
            attr = object.__getattribute__(attr, "__dict__")["__wrapped__"]
        except BaseException:
            break
    return None, True, found


def make_hook(g, method, variant, canon):
    """The hook the instrumented module calls: it looks at whatever `Solution` is bound to and, in a harm
    run, makes its graded method run the canonical class's method. That class is the same object in both
    harm runs; in "arb" its method returns 0 (the benchmark's arbitrary solution, shaped like the canonical
    one), so the two harm runs differ only inside the canonical class. Every step is taken in every variant
    (substitutes are built and kept even where they are not assigned, so not even the interpreter's object
    count differs); only the assignments depend on the variant. Returns (hook, bind_substitute)."""
    import types
    seen, keep = set(), []
    get = dict.get

    def plain(qualname, target):
        def _m(self, *args, **kwargs):
            return 0
        f = types.FunctionType(substitute_code(_m.__code__.replace(co_name=method, co_filename=_FILENAME),
                                               method, target, True), g, method)
        f.__qualname__ = "%s.%s" % (qualname, method)
        return f

    if canon is not None:
        cfn, cdrop, _ = locate(canon, method)
        if cfn is not None:   # the substitute's own method is never rewritten by the hook
            seen.add(id(cfn))
            zero = substitute_code(cfn.__code__, method, None, cdrop)
            keep.extend((cfn, cfn.__code__, zero))
            if variant == "arb":
                cfn.__code__ = zero
        else:
            zero = plain(type.__dict__["__qualname__"].__get__(canon), None)
            keep.append(zero)
            if variant == "arb":
                type.__setattr__(canon, method, zero)

    def act(obj, fn, drop):
        if fn is not None:
            try:
                c = fn.__code__
                # own: an equivalent copy (one unused constant more), so `__code__ is`/`==` a reference
                # the response kept gives the same answer in every run
                subs = (c.replace(co_consts=c.co_consts + (None,)), substitute_code(c, method, canon, drop))
                keep.extend((c,) + subs)
                fn.__code__ = subs[0] if variant == "own" else subs[1]
                return
            except BaseException:
                pass
        if variant == "own":
            return
        try:   # not a plain function (a callable object, a property, ...) or none at all: shadow it
            type.__setattr__(obj, method, plain(type.__dict__["__qualname__"].__get__(obj), canon))
        except BaseException:
            pass

    def hook():
        try:
            obj = get(g, "Solution")
            fn, drop, _ = locate(obj, method)
            if not issubclass(type(obj), type):
                return
            key = id(fn) if fn is not None else id(obj)
            if key in seen:
                return
            seen.add(key)
            keep.append(fn if fn is not None else obj)
            act(obj, fn, drop)
        except BaseException:
            pass

    def bind_substitute():
        """Harm runs whose Solution never got bound (module stopped early, standalone): the benchmark's
        substitute class, i.e. the canonical class (whose method returns 0 in "arb")."""
        obj = get(g, "Solution")
        if not issubclass(type(obj), type) and variant != "own" and canon is not None:
            g["Solution"] = canon
    return hook, bind_substitute


def _namespace():
    import builtins
    return {"__builtins__": builtins}


def _is_fatal(e):
    """Would this exception end the benchmark's harness process (its `except Exception` misses it)?"""
    return not issubclass(type(e), Exception)


def child_main(job, res_fd):
    """Runs in the forked child with rlimits set. Reports JSON lines on res_fd."""
    _write, _dumps = os.write, json.dumps

    def report(obj):
        try:
            data = (_dumps(obj) + "\n").encode("utf-8")
        except (ValueError, TypeError, RecursionError):
            data = (_dumps({k: v for k, v in obj.items() if k != "v"} | {"e": "unencodable"}) + "\n").encode()
        view = memoryview(data)
        while view:
            view = view[_write(res_fd, view):]

    def short(e):
        try:
            return str(type(e).__name__)[:80]
        except BaseException:
            return "error"

    if job.get("kind") == "check":
        prepared = _prepare_check(job, report, short)
        if prepared is None:
            flush_std()
            return
        compiled, g, hook, check = prepared
        report({"start": True})   # claims before this line were made before any model code ran
        try:
            exec(compiled, g)
        except BaseException as e:
            report({"exec": False, "e": short(e), "fatal": _is_fatal(e)})
        else:
            report({"exec": True})
        hook()
        check()
        flush_std()
        report({"done": True})
        return

    # kind == "gt": only the calls came in; return values go out as tagged plain data
    encode = make_encoder()
    try:
        compiled = compile(job["code"], _FILENAME, "exec")
    except BaseException as e:  # SyntaxError, ValueError (null bytes), MemoryError, RecursionError
        report({"compile": False, "e": short(e)})
        return
    report({"compile": True})
    g = _namespace()
    try:
        exec(compile(job["setup_code"], "<setup>", "exec"), g)
    except BaseException as e:   # the problem's own code: not the response ending the process
        report({"setup": False, "e": short(e)})
        report({"done": True})
        return
    try:
        exec(compiled, g)
    except BaseException as e:
        report({"exec": False, "e": short(e), "fatal": _is_fatal(e)})
        flush_std()
        report({"done": True})
        return
    report({"exec": True})
    for i, t in enumerate(job["tests"]):
        try:
            args = [eval(a, g) for a in t["args"]]
            kwargs = {k: eval(v, g) for k, v in t["kwargs"].items()}
            out = getattr(g["Solution"](), t["fn"])(*args, **kwargs)
        except BaseException as e:  # includes SystemExit / KeyboardInterrupt raised by the method
            report({"i": i, "e": short(e)})
            continue
        try:
            report({"i": i, "v": encode(out)})
        except NotPlain as e:
            report({"i": i, "e": str(e)[:120]})
        except BaseException as e:
            report({"i": i, "e": short(e)})
    flush_std()
    report({"done": True})


def _prepare_check(job, report, short):
    """Set up a check run. Everything variant-specific is decided here and kept only in closures; the job
    dict is emptied (it is also referenced by the runner's frames) before any model code runs.
    -> (compiled module, namespace, hook, check) or None when the program does not compile."""
    variant, mode, method = job["variant"], job["mode"], job["method"]
    code = "" if job.get("standalone") else job["code"]
    setup, canonical, tf = job["setup_code"], job.get("canonical") or "", job.get("test_func")
    tf_name, s_class, s_attr = job["run_tests_func"], job["sentinel_class"], job["sentinel_attr"]
    job.clear()
    try:
        try:
            compiled = instrument(code)
        except (SyntaxError, ValueError):
            raise
        except BaseException:   # e.g. RecursionError in the rewrite: the same in every variant
            compiled = compile(code, _FILENAME, "exec")
    except BaseException as e:
        report({"compile": False, "e": short(e)})
        return None
    report({"compile": True})
    g = _namespace()
    try:
        exec(compile(setup, "<setup>", "exec"), g)
    except BaseException as e:
        report({"setup": False, "e": short(e)})
        return None
    canon = None
    cg = dict(g)   # the canonical code shares the setup's objects (TreeNode, ...) but not the module's names
    try:
        exec(compile(canonical, _FILENAME, "exec"), cg)
        if issubclass(type(cg.get("Solution")), type):
            canon = cg["Solution"]
    except BaseException:
        pass
    del cg
    hook, bind_substitute = make_hook(g, method, variant, canon)
    compiled = _swap_const(compiled, _PLACEHOLDER, hook)
    harm = variant != "own"
    if harm and canon is None:
        report({"no_substitute": True})   # the canonical solution did not run: no harm verdict possible

    def define(src, into_class=None):
        """Execute a test function's source (the module never defined it), in the module's namespace."""
        if into_class is None:
            exec(compile(src, _FILENAME, "exec"), g)
            return
        body = "class _T:\n" + "".join("    " + line + "\n" for line in src.splitlines())
        tmp = {}
        exec(compile(body, _FILENAME, "exec"), g, tmp)
        type.__setattr__(into_class, tf_name, type.__dict__["__dict__"].__get__(tmp["_T"])[tf_name])

    def has_attr(cls, name):
        try:
            return any(name in type.__dict__["__dict__"].__get__(k) for k in type.__dict__["__mro__"].__get__(cls))
        except BaseException:
            return False

    def check_tests():
        # The same lines and calls run in every variant whenever the module defined what the check needs
        # (a response's sys.settrace/setprofile sees this code): `harm` is tested last, only when a harm
        # run has something to fill in.
        method_form = tf is not None and tf["form"] == "method"
        parent = tf["parent"] if method_form else None
        try:
            bind_substitute()
            if tf is not None and method_form:
                cls = g.get(parent)
                if issubclass(type(cls), type) and not has_attr(cls, tf_name) and harm:
                    define(tf["src"], cls)
            elif tf is not None and tf_name not in g and harm:
                define(tf["src"])
            hook()
        except BaseException:
            pass
        call = "%s().%s()" % (parent, tf_name) if method_form else "%s()" % tf_name
        try:
            present = has_attr(g[parent], tf_name) if method_form else callable(g[tf_name])
        except BaseException:
            present = False
        report({"test_present": present})
        try:
            eval(compile(call, "<string>", "eval"), g)
        except BaseException as e:
            report({"test": False, "e": short(e)})
        else:
            report({"test": True})

    def check_sentinel():
        try:
            cls = g[s_class]
            value = getattr(cls, s_attr)
        except BaseException:
            report({"sentinel": None})
            return
        try:
            report({"sentinel": bool(value)})
        except BaseException:
            report({"sentinel": False})

    if mode in ("run_tests", "none"):
        check = check_tests
    elif mode == "sentinel":
        check = check_sentinel
    else:   # stdout_marker / file_marker are judged by the host from captured stdout and the result file
        def check():
            pass
    return compiled, g, hook, check


def flush_std():
    for s in (sys.stdout, sys.stderr):
        try:
            s.flush()
        except BaseException:
            pass


# ----------------------------------------------------------------------------- syscalls we call or filter

# name: (x86_64, aarch64) numbers, from asm/unistd_64.h and asm-generic/unistd.h (the test checks them where the
# headers are installed); None: the architecture has no such call (aarch64 has only the *at variants).
SYSCALLS = {
    "kill": (62, 129), "tkill": (200, 130), "tgkill": (234, 131), "rt_sigqueueinfo": (129, 138),
    "rt_tgsigqueueinfo": (297, 240), "ptrace": (101, 117), "process_vm_readv": (310, 270),
    "process_vm_writev": (311, 271), "pidfd_send_signal": (424, 424), "pidfd_open": (434, 434),
    "pidfd_getfd": (438, 438), "kcmp": (312, 272), "process_madvise": (440, 440), "process_mrelease": (448, 448),
    "io_uring_setup": (425, 425),
    # kernel objects that outlive processes: keys, SysV IPC, POSIX message queues
    "add_key": (248, 217), "request_key": (249, 218), "keyctl": (250, 219),
    "shmget": (29, 194), "shmat": (30, 196), "shmctl": (31, 195), "shmdt": (67, 197),
    "semget": (64, 190), "semop": (65, 193), "semctl": (66, 191), "semtimedop": (220, 192),
    "msgget": (68, 186), "msgsnd": (69, 189), "msgrcv": (70, 188), "msgctl": (71, 187),
    "mq_open": (240, 180), "mq_unlink": (241, 181), "mq_timedsend": (242, 182), "mq_timedreceive": (243, 183),
    "mq_notify": (244, 184), "mq_getsetattr": (245, 185),
    # memory the rlimits do not see, and kernel attack surface no solution needs
    "memfd_create": (319, 279), "memfd_secret": (447, 447), "userfaultfd": (323, 282),
    "perf_event_open": (298, 241), "bpf": (321, 280),
    # namespaces and mounts
    "unshare": (272, 97), "setns": (308, 268), "clone": (56, 220), "clone3": (435, 435),
    "mount": (165, 40), "umount2": (166, 39), "pivot_root": (155, 41), "chroot": (161, 51),
    "fsopen": (430, 430), "fsconfig": (431, 431), "fsmount": (432, 432), "fspick": (433, 433),
    "move_mount": (429, 429), "open_tree": (428, 428), "mount_setattr": (442, 442),
    # state that other jobs could observe: file metadata, locks, file watches, page-cache state, our own
    # scheduling attributes (readable by pid), free memory and disk space
    "chmod": (90, None), "fchmod": (91, 52), "fchmodat": (268, 53), "fchmodat2": (452, 452),
    "chown": (92, None), "fchown": (93, 55), "lchown": (94, None), "fchownat": (260, 54),
    "utime": (132, None), "utimes": (235, None), "futimesat": (261, None), "utimensat": (280, 88),
    "setxattr": (188, 5), "lsetxattr": (189, 6), "fsetxattr": (190, 7), "removexattr": (197, 14),
    "lremovexattr": (198, 15), "fremovexattr": (199, 16), "setxattrat": (463, 463), "removexattrat": (466, 466),
    "flock": (73, 32), "fanotify_init": (300, 262), "inotify_init": (253, None), "inotify_init1": (294, 26),
    "inotify_add_watch": (254, 27), "fadvise64": (221, 223), "cachestat": (451, 451),
    "setpriority": (141, 140), "sched_setparam": (142, 118), "sched_setscheduler": (144, 119),
    "sched_setaffinity": (203, 122), "sched_setattr": (314, 274), "ioprio_set": (251, 30),
    "sysinfo": (99, 179), "statfs": (137, 43), "fstatfs": (138, 44),
    # allowed, with a look at one argument (SECCOMP_ARGS)
    "fcntl": (72, 25), "ioctl": (16, 29), "prlimit64": (302, 261), "socket": (41, 198), "socketpair": (53, 199),
    "prctl": (157, 167),
    # called by the harness itself
    "capset": (126, 91), "landlock_create_ruleset": (444, 444), "landlock_add_rule": (445, 445),
    "landlock_restrict_self": (446, 446),
}
ARCH_INDEX = {"x86_64": 0, "aarch64": 1}


def nr(name):
    return SYSCALLS[name][ARCH_INDEX[os.uname().machine]]


_LIBC = []


def libc():
    if not _LIBC:
        import ctypes
        lib = ctypes.CDLL(None, use_errno=True)
        lib.syscall.restype = ctypes.c_long
        _LIBC.append(lib)
    return _LIBC[0]


def check(r, what):
    """A libc/syscall return value: negative -> OSError(errno, what)."""
    if r < 0:
        import ctypes
        err = ctypes.get_errno()
        raise OSError(err, "%s: %s" % (what, os.strerror(err)))
    return r


def setup_child(job, res_w, out_w, err_w, jobdir):
    """In the job child, before model code: own session, rlimits, fds 0-3 (and the Landlock ruleset), a
    session keyring of its own (a key added to an inherited one would outlive the job) and TMPDIR/HOME in
    the job dir."""
    os.setsid()
    os.chdir(jobdir)
    tl = float(job["time_limit"])
    cpu = int(tl) + 1
    nproc = int(job.get("nproc_rlimit", job["nproc"]))
    limits = [(resource.RLIMIT_CPU, (cpu, cpu + 1)), (resource.RLIMIT_CORE, (0, 0)),
              (resource.RLIMIT_FSIZE, (job["fsize_mb"] << 20,) * 2), (resource.RLIMIT_NPROC, (nproc, nproc)),
              (resource.RLIMIT_NOFILE, (NOFILE, NOFILE))]
    if ISOLATE:   # no bytes for POSIX message queues (the filter refuses mq_open too)
        limits.append((resource.RLIMIT_MSGQUEUE, (0, 0)))
    if job.get("mem_mb"):
        limits.append((resource.RLIMIT_AS, (job["mem_mb"] << 20,) * 2))
    for what, lim in limits:
        try:
            resource.setrlimit(what, lim)
        except (ValueError, OSError):
            pass
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)   # oversized writes fail with EFBIG instead of killing
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(out_w, 1)
    os.dup2(err_w, 2)
    res_fd = os.dup2(res_w, 3)
    if LANDLOCK_FD is None:
        os.closerange(4, 65536)
    else:
        os.closerange(4, LANDLOCK_FD)
        os.closerange(LANDLOCK_FD + 1, 65536)
    sys.stdout = open(1, "w", encoding="utf-8", errors="replace", closefd=False)
    sys.stderr = open(2, "w", encoding="utf-8", errors="replace", closefd=False)
    sys.stdin = open(0, "r", closefd=False)
    os.environ["HOME"] = os.environ["TMPDIR"] = jobdir
    if ISOLATE:
        try:
            libc().syscall(nr("keyctl"), 1, None)   # KEYCTL_JOIN_SESSION_KEYRING, NULL: a fresh anonymous one
        except Exception:
            pass
    return res_fd


def drop_capabilities():
    """The child holds every capability in the job's user namespace (the runner made it); give them all up
    before model code, so it cannot remount, mount or unmount anything (capset to the empty sets)."""
    import ctypes
    header = struct.pack("=Ii", 0x20080522, 0)   # _LINUX_CAPABILITY_VERSION_3, this process
    data = bytes(24)                            # 2 x {effective, permitted, inheritable} = 0
    check(libc().syscall(nr("capset"), ctypes.c_char_p(header), ctypes.c_char_p(data)), "capset")


# ----------------------------------------------------------------------------- seccomp (job child only)

# Why: without bwrap and without a uid drop (the docker-compose grader: one unprivileged uid, no user
# namespaces), the server, the zygotes and every job share one uid, so a response could `kill(-1)`,
# `kill(os.getppid())` or SIGKILL the server pid it finds in /proc and take the grading service down, or
# ptrace / process_vm_writev its way into another process; and without per-job namespaces, anything it left
# in the kernel (a SysV segment, a key, a message queue) would be there for the next job. The per-job child
# therefore installs a seccomp-BPF filter right before model code runs: the syscalls below fail with EPERM for
# the child and all its descendants (filters are inherited and cannot be removed). The wall-time kill and the
# sweep come from the runner / zygote, which never run under the filter.
SECCOMP_EPERM = (
    "kill", "tkill", "tgkill", "rt_sigqueueinfo", "rt_tgsigqueueinfo", "ptrace", "process_vm_readv",
    "process_vm_writev", "pidfd_send_signal", "pidfd_open", "pidfd_getfd", "kcmp", "process_madvise",
    "process_mrelease", "io_uring_setup",
    "add_key", "request_key", "keyctl", "shmget", "shmat", "shmctl", "shmdt", "semget", "semop", "semctl",
    "semtimedop", "msgget", "msgsnd", "msgrcv", "msgctl", "mq_open", "mq_unlink", "mq_timedsend",
    "mq_timedreceive", "mq_notify", "mq_getsetattr",
    "memfd_create", "memfd_secret", "userfaultfd", "perf_event_open", "bpf",
    "unshare", "setns", "mount", "umount2", "pivot_root", "chroot", "fsopen", "fsconfig", "fsmount", "fspick",
    "move_mount", "open_tree", "mount_setattr",
    "chmod", "fchmod", "fchmodat", "fchmodat2", "chown", "fchown", "lchown", "fchownat", "utime", "utimes",
    "futimesat", "utimensat", "setxattr", "lsetxattr", "fsetxattr", "removexattr", "lremovexattr",
    "fremovexattr", "setxattrat", "removexattrat", "flock", "fanotify_init", "inotify_init", "inotify_init1",
    "inotify_add_watch", "fadvise64", "cachestat", "setpriority", "sched_setparam", "sched_setscheduler",
    "sched_setaffinity", "sched_setattr", "ioprio_set", "sysinfo", "statfs", "fstatfs")
# clone3 passes its flags in memory the filter cannot read: ENOSYS makes glibc fall back to clone(2).
SECCOMP_ENOSYS = ("clone3",)
CLONE_NS = 0x00020000 | 0x02000000 | 0x04000000 | 0x08000000 | 0x10000000 | 0x20000000 | 0x40000000
AF_UNIX, AF_INET, AF_INET6 = 1, 2, 10
# (syscall, argument, kind, values): "mask" refuses it if any bit of `values` is set in the argument, "allow"
# refuses it unless the argument is one of `values`, "deny" refuses it if the argument is one of them.
#  clone: no new namespaces (a nested user namespace is kernel attack surface, and could hold mounts).
#  fcntl: no record locks / leases / dnotify (a lock on a shared read-only stdlib file is a channel to a
#         concurrent job) and no F_SETOWN/F_SETSIG (SIGIO to any same-uid pid would bypass the kill filter).
#  ioctl: FIOSETOWN / SIOCSPGRP, the same owner trick on sockets.
#  prlimit64: own limits only (another process's limits would be a readable channel).
#  prctl: not PR_SET_PDEATHSIG (the child dies with its runner; it may not undo that).
#  socket: Unix sockets never (without bwrap the grader's own socket would be reachable), inet only where
#         each sandbox has its own network namespace; socketpair stays (asyncio).
F_LOCKISH = (5, 6, 7, 8, 10, 15, 36, 37, 38, 1024, 1026)   # GETLK SETLK SETLKW SETOWN SETSIG SETOWN_EX OFD_* LEASE NOTIFY
FIOSETOWN, SIOCSPGRP = 0x8901, 0x8902
AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}   # EM_* | __AUDIT_ARCH_64BIT | __AUDIT_ARCH_LE
X32_SYSCALL_BIT = 0x40000000


def seccomp_args(inet):
    return (("clone", 0, "mask", (CLONE_NS,)), ("fcntl", 1, "deny", F_LOCKISH),
            ("ioctl", 1, "deny", (FIOSETOWN, SIOCSPGRP)), ("prlimit64", 0, "allow", (0,)), ("prctl", 0, "deny", (1,)),
            ("socket", 0, "allow", (AF_INET, AF_INET6) if inet else ()), ("socketpair", 0, "allow", (AF_UNIX,)))


def seccomp_program(machine, inet=True):
    """The BPF program as bytes (struct sock_filter[]). A syscall of a foreign arch (i386 `int 0x80` on
    x86_64, aarch32 on aarch64) or of the x32 ABI gets EPERM wholesale: those tables number kill & co
    differently, and legitimate Python code never uses them. Arguments are compared on their low 32 bits,
    all the kernel reads of an int / unsigned int argument."""
    LD, JEQ, JGE, JSET, RET = 0x20, 0x15, 0x35, 0x45, 0x06   # BPF_LD|W|ABS, BPF_JMP|{JEQ,JGE,JSET}|K, BPF_RET|K
    ALLOW, EPERM, ENOSYS = 0x7FFF0000, 0x00050000 | 1, 0x00050000 | 38   # SECCOMP_RET_ALLOW, RET_ERRNO | errno
    idx = ARCH_INDEX[machine]
    num = {name: v[idx] for name, v in SYSCALLS.items() if v[idx] is not None}
    prog, labels = [], {}

    def ins(code, k, jt=None, jf=None):   # jt/jf: a label, or None for the next instruction
        prog.append([code, jt, jf, k])

    ins(LD, 4)                                          # A = seccomp_data.arch
    ins(JEQ, AUDIT_ARCH[machine], None, "deny")
    ins(LD, 0)                                          # A = seccomp_data.nr
    if machine == "x86_64":
        ins(JGE, X32_SYSCALL_BIT, "deny")
    for n in sorted({num[s] for s in SECCOMP_EPERM if s in num}):
        ins(JEQ, n, "deny")
    for n in sorted({num[s] for s in SECCOMP_ENOSYS if s in num}):
        ins(JEQ, n, "enosys")
    rules = seccomp_args(inet)
    for i, (name, _, _, _) in enumerate(rules):
        ins(JEQ, num[name], "arg%d" % i)
    ins(RET, ALLOW)
    for i, (name, arg, kind, values) in enumerate(rules):
        labels["arg%d" % i] = len(prog)
        ins(LD, 16 + 8 * arg)                           # A = low 32 bits of args[arg] (little-endian)
        if kind == "mask":
            ins(JSET, values[0], "deny")
            ins(RET, ALLOW)
        else:
            for v in values:
                ins(JEQ, v, "allow" if kind == "allow" else "deny")
            ins(RET, EPERM if kind == "allow" else ALLOW)
    for name, action in (("allow", ALLOW), ("deny", EPERM), ("enosys", ENOSYS)):
        labels[name] = len(prog)
        ins(RET, action)
    out = []
    for pc, (code, jt, jf, k) in enumerate(prog):
        offs = [0 if t is None else labels[t] - pc - 1 for t in (jt, jf)]
        assert all(0 <= o < 256 for o in offs), "seccomp jump out of range"
        out.append(struct.pack("=HBBI", code, offs[0], offs[1], k))
    return b"".join(out)


def seccomp_prepare(inet=True):
    """-> (install, status). Built once in the zygote, so a job pays two prctl calls; `install()` raises
    OSError if the kernel refuses. status is "on" or "off: <why>"."""
    machine = os.uname().machine
    if machine not in ARCH_INDEX or struct.calcsize("P") != 8:
        return None, "off: no filter for this architecture (%s)" % machine
    try:
        import ctypes
        lib = libc()
        prctl = lib.prctl
        code = seccomp_program(machine, inet)
        buf = ctypes.create_string_buffer(code, len(code))

        class SockFprog(ctypes.Structure):
            _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]
        fprog = SockFprog(len(code) // 8, ctypes.addressof(buf))
        ul = ctypes.c_ulong
        args_nnp = (ul(38), ul(1), ul(0), ul(0), ul(0))                            # PR_SET_NO_NEW_PRIVS
        args_filter = (ul(22), ul(2), ul(ctypes.addressof(fprog)), ul(0), ul(0))   # PR_SET_SECCOMP, FILTER
    except Exception as e:
        return None, "off: cannot build the filter (%s)" % type(e).__name__

    def install(_keep=(buf, fprog)):
        for args in (args_nnp, args_filter):
            if prctl(*args) != 0:
                err = ctypes.get_errno()
                raise OSError(err, os.strerror(err))
    return install, "on"


def _probe_in_child(apply, blocked):
    """Fork a throwaway child that runs apply() then blocked() -> exit code: 0 = the layer works (blocked() is
    True), 100+errno = apply() was refused by the kernel, 1 = applied but the forbidden act went through."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            try:
                apply()
            except OSError as e:
                code = 100 + min(e.errno or 0, 99)
            else:
                code = 0 if blocked() else 1
        finally:
            os._exit(code)
    _, st = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(st)


def seccomp_probe(install):
    """Install the filter in a throwaway child and check that kill() and a SysV segment really fail."""
    def blocked():
        import ctypes
        try:
            os.kill(os.getpid(), 0)
            return False
        except PermissionError:
            pass
        shm = libc().syscall(nr("shmget"), 0, 4096, 0o1600)   # IPC_PRIVATE, IPC_CREAT | 0600
        if shm >= 0:
            libc().syscall(nr("shmctl"), shm, 0, None)       # IPC_RMID: leave nothing behind
            return False
        return ctypes.get_errno() == 1

    code = _probe_in_child(install, blocked)
    if code == 0:
        return "on"
    if code >= 100:
        return "off: the kernel refused the filter (%s)" % os.strerror(code - 100)
    return "off: the filter did not block kill() / shmget() (exit %d)" % code


# ----------------------------------------------------------------------------- landlock (job child only)

# Why: seccomp cannot look at paths. Without bwrap a job shares the grader's file system: it could read the
# problem files (the answer key) and everything else its uid may read, unlink or replace the grader's socket,
# or leave files for a later job. Landlock (Linux 5.13+, unprivileged) lets the child keep only: reading the
# interpreter's own files (the stdlib without site-/dist-packages, the shared libraries it loads, the
# executable) and a few system files (ld.so.cache, the time zone); reading and writing its job dir; plain
# reads/writes of /dev/null, zero, full, random and urandom. On top (ABI 4+) TCP bind/connect is refused and
# (ABI 6+) signals and abstract Unix sockets cannot reach any process outside the job. The ruleset is built
# once by the zygote and applied by each child (two syscalls). Stat-ing a path stays possible (Landlock does
# not mediate it): names and sizes, never contents.
LL_EXECUTE, LL_WRITE_FILE, LL_READ_FILE, LL_READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
LL_REFER, LL_TRUNCATE, LL_IOCTL_DEV = 1 << 13, 1 << 14, 1 << 15
LL_FILE_RIGHTS = LL_EXECUTE | LL_WRITE_FILE | LL_READ_FILE | LL_TRUNCATE | LL_IOCTL_DEV   # valid on a file
DEV_FILES = ("/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom")
SYSTEM_FILES = ("/etc/ld.so.cache", "/etc/localtime", "/usr/share/zoneinfo")


def interpreter_paths(extra_forbid=()):
    """-> (trees to allow read, forbidden trees): the stdlib dir, the dirs of the shared objects this
    interpreter has loaded, the executable, ld.so.cache & co; minus every site-/dist-packages (a pip-installed
    pgrpo would carry the problem data there) and whatever the host names (the package, the repo)."""
    real = os.path.realpath
    stdlib = real(os.path.dirname(os.__file__))
    ver = "python%d.%d" % sys.version_info[:2]
    forbid = {real(p) for p in extra_forbid}
    for prefix in {sys.prefix, sys.base_prefix, sys.exec_prefix, "/usr", "/usr/local"}:
        for sub in ("lib/%s/site-packages" % ver, "lib/%s/dist-packages" % ver, "lib/python3/dist-packages",
                    "local/lib/%s/dist-packages" % ver, "lib64/%s/site-packages" % ver):
            forbid.add(real(os.path.join(prefix, sub)))
    for sub in ("site-packages", "dist-packages"):
        forbid.add(os.path.join(stdlib, sub))
    forbid = {f for f in forbid if os.path.exists(f)}
    allow = [stdlib, real(sys.executable)] + [p for p in SYSTEM_FILES if os.path.exists(p)]
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                parts = line.split(None, 5)
                if len(parts) == 6 and parts[5].startswith("/") and ".so" in parts[5]:
                    allow.append(real(os.path.dirname(parts[5].strip())))
    except OSError:
        pass
    return sorted(set(allow)), sorted(forbid)


def landlock_prepare(rw_dir, forbid=()):
    """Build the job ruleset once -> (ruleset fd at RULESET_FD or None, status). `rw_dir`: the one tree the
    job may write (its job dir, or the dir the per-job tmpfs is mounted under)."""
    if os.uname().machine not in ARCH_INDEX or struct.calcsize("P") != 8:
        return None, "off: no landlock numbers for this architecture"
    try:
        import ctypes
        lib = libc()
        abi = lib.syscall(nr("landlock_create_ruleset"), None, ctypes.c_size_t(0), ctypes.c_uint32(1))   # VERSION
        if abi < 1:
            return None, "off: landlock unavailable (%s)" % os.strerror(ctypes.get_errno())
    except Exception as e:
        return None, "off: cannot call landlock (%s)" % type(e).__name__
    fs = (1 << 13) - 1 | (LL_REFER if abi >= 2 else 0) | (LL_TRUNCATE if abi >= 3 else 0) | \
        (LL_IOCTL_DEV if abi >= 5 else 0)
    fields = [fs]
    if abi >= 4:
        fields.append(1 | 2)   # LANDLOCK_ACCESS_NET_BIND_TCP | CONNECT_TCP, with no rule: refused
    if abi >= 6:
        fields.append(1 | 2)   # LANDLOCK_SCOPE_ABSTRACT_UNIX_SOCKET | SIGNAL
    attr = struct.pack("=%dQ" % len(fields), *fields)
    try:
        rfd = check(lib.syscall(nr("landlock_create_ruleset"), ctypes.c_char_p(attr), ctypes.c_size_t(len(attr)),
                                ctypes.c_uint32(0)), "landlock_create_ruleset")
    except OSError as e:
        return None, "off: the kernel refused the ruleset (%s)" % os.strerror(e.errno)

    def rule(path, access):
        try:
            pfd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        except OSError:
            return
        try:
            if not stat.S_ISDIR(os.fstat(pfd).st_mode):
                access &= LL_FILE_RIGHTS
            rule_attr = ctypes.create_string_buffer(struct.pack("=Qi", access & fs, pfd), 12)   # packed struct
            check(lib.syscall(nr("landlock_add_rule"), ctypes.c_int(rfd), ctypes.c_int(1), rule_attr,
                              ctypes.c_uint32(0)), "landlock_add_rule " + path)
        finally:
            os.close(pfd)

    read = LL_READ_FILE | LL_READ_DIR | LL_EXECUTE
    allow, forbidden = interpreter_paths(forbid)

    def allow_tree(path):
        # a rule covers everything beneath it: where a forbidden tree lies below, grant the siblings instead
        below = [f for f in forbidden if f == path or f.startswith(path.rstrip("/") + "/")]
        if not below:
            rule(path, read)
        elif path not in below:
            try:
                names = os.listdir(path)
            except OSError:
                return
            for name in names:
                allow_tree(os.path.join(path, name))

    try:
        for path in allow:
            allow_tree(path)
        for dev in DEV_FILES:
            rule(dev, LL_READ_FILE | LL_WRITE_FILE | LL_TRUNCATE | LL_IOCTL_DEV)
        rule(rw_dir, fs)
        if rfd != RULESET_FD:
            os.dup2(rfd, RULESET_FD)
            os.close(rfd)
        os.set_inheritable(RULESET_FD, False)   # fork keeps it; an exec in the job would not
    except OSError as e:
        os.close(rfd)
        return None, "off: cannot build the ruleset (%s)" % e
    return RULESET_FD, "on (abi %d)" % abi


def landlock_restrict(fd):
    lib = libc()
    check(lib.prctl(38, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")   # required before restrict_self
    check(lib.syscall(nr("landlock_restrict_self"), fd, 0), "landlock_restrict_self")


def landlock_probe(fd, jobdir, outside_write):
    """Restrict a throwaway child and check: the job dir is writable, "/" cannot be listed (reads are
    confined) and, if given, a file beside the job dir cannot be created -> None if so, else "off: <why>"."""
    def ok():
        p = os.path.join(jobdir, ".landlock-probe")
        open(p, "w").close()
        os.unlink(p)
        acts = [lambda: os.listdir("/")]
        if outside_write:
            acts.append(lambda: open(outside_write, "w").close())
        for act in acts:
            try:
                act()
            except PermissionError:
                continue
            return False
        return True

    code = _probe_in_child(lambda: landlock_restrict(fd), ok)
    if outside_write:
        try:
            os.unlink(outside_write)
        except OSError:
            pass
    if code == 0:
        return None
    if code >= 100:
        return "off: the kernel refused the ruleset (%s)" % os.strerror(code - 100)
    return "off: the ruleset did not confine reads or writes (exit %d)" % code


# ----------------------------------------------------------------------------- per-job namespaces

CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
MS_NOSUID, MS_NODEV, MS_NOEXEC = 2, 4, 8


def enter_namespaces(flags, jobdir, tmp_mb):
    """In the runner: move into fresh namespaces for one job, map our uid (non-root inside), make every
    mount read-only and private, and mount a fresh size-capped tmpfs on the job dir. Raises OSError."""
    import ctypes
    lib = libc()
    uid, gid = os.geteuid(), os.getegid()
    check(lib.unshare(flags), "unshare")
    lib.prctl(4, 1, 0, 0, 0)   # PR_SET_DUMPABLE: a non-dumpable process's /proc/self files belong to root
    try:
        for name, text in (("setgroups", "deny"), ("uid_map", "%d %d 1" % (uid or 1, uid)),
                           ("gid_map", "%d %d 1" % (gid or 1, gid))):
            fd = os.open("/proc/self/" + name, os.O_WRONLY)
            try:
                os.write(fd, text.encode())
            finally:
                os.close(fd)
    finally:
        lib.prctl(4, 0, 0, 0, 0)   # and undumpable again, before any job process exists
    # struct mount_attr {attr_set, attr_clr, propagation, userns_fd}: MOUNT_ATTR_RDONLY, MS_PRIVATE, recursive
    attr = struct.pack("=4Q", 1, 0, 1 << 18, 0)
    check(lib.syscall(nr("mount_setattr"), -100, b"/", 0x8000, ctypes.c_char_p(attr), len(attr)), "mount_setattr")
    opts = ("size=%dm,nr_inodes=65536,mode=0700" % tmp_mb).encode()
    check(lib.mount(b"tmpfs", jobdir.encode(), b"tmpfs", MS_NOSUID | MS_NODEV, opts), "mount tmpfs")


def mount_proc():
    """In the job's init (pid 1 of its namespace): a /proc that shows only the job's processes (the runner
    reads their CPU and memory there)."""
    check(libc().mount(b"proc", b"/proc", b"proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, None), "mount proc")


def ns_prepare(jobdir, netns, tmp_mb):
    """Probe the per-job namespaces in a throwaway child -> (NS dict or None, status)."""
    flags = CLONE_NEWUSER | CLONE_NEWPID | CLONE_NEWIPC | CLONE_NEWNS | CLONE_NEWUTS | (CLONE_NEWNET if netns else 0)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        msg = b"ok"
        try:
            enter_namespaces(flags, jobdir, 1)
            init = os.fork()
            if init == 0:
                try:
                    mount_proc()
                    code = 0 if os.getpid() == 1 and os.listdir("/proc") else 1
                except OSError:
                    code = 2
                os._exit(code)
            _, st = os.waitpid(init, 0)
            msg = b"ok" if os.waitstatus_to_exitcode(st) == 0 else b"ok-noproc"
        except BaseException as e:
            msg = str(e)[:200].encode("utf-8", "replace")
        os.write(w, msg)
        os._exit(0)
    os.close(w)
    msg = os.read(r, 256).decode("utf-8", "replace")
    os.close(r)
    os.waitpid(pid, 0)
    if not msg.startswith("ok"):
        return None, "off: %s" % (msg or "probe died")
    names = "user, pid, ipc, mount, uts" + (", net" if netns else "")
    proc = msg == "ok"
    return {"flags": flags, "proc": proc, "tmp_mb": tmp_mb}, "on (%s%s)" % (names, "" if proc else "; no own /proc")


# ----------------------------------------------------------------------------- zygote side

def read_result_file(jobdir, name):
    """Head of the response's result file; never follows a symlink, only regular files."""
    if not name:
        return None
    try:
        fd = os.open(os.path.join(jobdir, name), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        return os.read(fd, 4096).decode("utf-8", "replace")
    finally:
        os.close(fd)


CLK_TCK = os.sysconf("SC_CLK_TCK")
DISK_ENTRIES = 16384      # flat mode: files a job dir may hold (with namespaces: the tmpfs's own nr_inodes cap)


def dir_usage(path, max_entries=DISK_ENTRIES):
    """(bytes allocated, entries) beneath `path`, walking at most max_entries + 1 entries (never symlinks)."""
    total, count, todo = 0, 0, [path]
    while todo and count <= max_entries:
        try:
            with os.scandir(todo.pop()) as it:
                for e in it:
                    count += 1
                    if count > max_entries:
                        break
                    try:
                        st = e.stat(follow_symlinks=False)
                    except OSError:
                        continue
                    total += st.st_blocks * 512
                    if stat.S_ISDIR(st.st_mode):
                        todo.append(e.path)
        except OSError:
            continue
    return total, count


def proc_usage(root, skip=()):
    """CPU seconds (own + reaped children) and resident pages of `root` and all its descendants, from /proc:
    -> (pids, cpu_s, resident pages). Nodes in `skip` are walked through but not counted."""
    rows = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % name, "rb") as f:
                data = f.read()
            f = data.rsplit(b")", 1)[1].split()
            rows[int(name)] = (int(f[1]), int(f[11]) + int(f[12]) + int(f[13]) + int(f[14]), int(f[21]))
        except (OSError, IndexError, ValueError):
            continue
    kids = {}
    for pid, row in rows.items():
        kids.setdefault(row[0], []).append(pid)
    pids, ticks, rss = [], 0, 0
    todo = [root]
    while todo:
        p = todo.pop()
        todo.extend(kids.get(p, ()))
        if p in rows and p not in skip:
            pids.append(p)
            ticks += rows[p][1]
            rss += max(0, rows[p][2] - BASE_RSS)   # every process shares the zygote's pages copy-on-write
    return pids, ticks / CLK_TCK, rss + (BASE_RSS if pids else 0)


class Capture:
    """Bytes read from one pipe: the first `head` bytes and the last `tail` bytes (amortised O(1) per byte)."""

    def __init__(self, head, tail=0):
        self.head_cap, self.tail_cap = head, tail
        self.head, self.tail, self.dropped = bytearray(), bytearray(), 0

    def add(self, chunk):
        room = self.head_cap - len(self.head)
        if room > 0:
            self.head += chunk[:room]
            chunk = chunk[room:]
        if not chunk:
            return
        if not self.tail_cap:
            self.dropped += len(chunk)
            return
        self.tail += chunk
        if len(self.tail) > 2 * self.tail_cap:
            cut = len(self.tail) - self.tail_cap
            del self.tail[:cut]
            self.dropped += cut

    def text(self):
        if len(self.tail) > self.tail_cap:
            cut = len(self.tail) - self.tail_cap
            del self.tail[:cut]
            self.dropped += cut
        data = self.head + (b"\n" if self.dropped and self.tail else b"") + self.tail
        return data.decode("utf-8", "replace")


def child_path(job, pipes, jobdir, in_ns, parent):
    """The job child: limits, then (in a namespace) no capabilities, Landlock, seccomp, model code."""
    try:
        # if the runner (or init) is killed, so is the child: without namespaces nothing else would end a job
        # whose sandbox was torn down mid-run (the filter keeps it from undoing this)
        libc().prctl(1, int(signal.SIGKILL), 0, 0, 0)   # PR_SET_PDEATHSIG
        if os.getppid() != parent:
            os._exit(1)
        res_fd = setup_child(job, pipes[0][1], pipes[1][1], pipes[2][1], jobdir)
        if in_ns:
            drop_capabilities()   # raises: then no model code runs
        if LANDLOCK_FD is not None:
            try:
                landlock_restrict(LANDLOCK_FD)
            except OSError:
                pass   # the startup probe saw it work; a refusal now still grades (health says how)
            os.close(LANDLOCK_FD)
        if SECCOMP_INSTALL is not None:   # last step before model code: nothing below signals anyone
            try:
                SECCOMP_INSTALL()
            except OSError:
                pass
        child_main(job, res_fd)
    except BaseException:
        pass
    finally:
        os._exit(0)


def init_main(job, pipes, status_w, jobdir):
    """pid 1 of the job's pid namespace: forks the child, reaps orphans, reports the child's exit status and
    exits with it, which makes the kernel kill every other process of the namespace."""
    try:
        libc().prctl(1, int(signal.SIGKILL), 0, 0, 0)   # PR_SET_PDEATHSIG: the runner dies -> so do we, and the job
        if NS["proc"]:
            mount_proc()
        pid = os.fork()
    except BaseException:
        os._exit(1)
    if pid == 0:
        os.close(status_w)
        child_path(job, pipes, jobdir, in_ns=True, parent=1)
    os.closerange(3, status_w)   # the job's pipes, the zygote's frames, the ruleset: init needs none of them
    os.closerange(status_w + 1, 65536)
    os.write(status_w, b"S")
    while True:
        try:
            wpid, st = os.waitpid(-1, 0)
        except ChildProcessError:
            os._exit(0)
        except InterruptedError:
            continue
        if wpid == pid:
            os.write(status_w, struct.pack("=ci", b"E", os.waitstatus_to_exitcode(st)))
            os._exit(0)


def run_job(job, base, jobdir):
    t0 = time.monotonic()
    if NS is not None:
        enter_namespaces(NS["flags"], jobdir, NS["tmp_mb"])
    pipes = [os.pipe() for _ in range(3)]   # results, stdout, stderr
    status_r, status_w = os.pipe() if NS is not None else (None, None)
    runner = os.getpid()
    pid = os.fork()
    if pid == 0:
        for r, _ in pipes:
            os.close(r)
        if NS is not None:
            os.close(status_r)
            init_main(job, pipes, status_w, jobdir)
        child_path(job, pipes, jobdir, in_ns=False, parent=runner)
    for _, w in pipes:
        os.close(w)
    if status_w is not None:
        os.close(status_w)
    caps = [Capture(RESULT_HEAD, RESULT_TAIL), Capture(int(job.get("out_cap", 1 << 20))), Capture(ERR_CAP)]
    open_fds = {pipes[i][0]: i for i in range(3)}
    if status_r is not None:
        open_fds[status_r] = 3
    deadline = t0 + float(job["time_limit"])
    cpu_budget = float(job["time_limit"])   # core-seconds for all its processes together
    mem_budget = (int(job.get("mem_mb") or 0) << 20) // os.sysconf("SC_PAGE_SIZE")
    # who to account: the job's /proc (all of it), or the descendants of init / of the zygote
    if NS is not None:
        root, skip = (1, ()) if NS["proc"] else (pid, ())
    else:
        root, skip = os.getppid(), (os.getppid(), os.getpid())
    poll = int(job.get("nproc_rlimit", job["nproc"])) > 1   # a single process is bounded by its own rlimits
    # without namespaces the job dir lies on a file system other jobs share (the container's /tmp): cap it here,
    # as the per-job tmpfs does by itself (size, nr_inodes)
    disk_budget = None if NS is not None else DISK_MB << 20
    next_disk = t0 + 2 * POLL_S
    status, exit_code, limit, started, reaped = "ok", None, None, NS is None, False
    grace_until = None
    next_poll, cpu_s, procs, job_pids = t0 + POLL_S, 0.0, 1, []
    status_buf = b""
    while open_fds:
        now = time.monotonic()
        if exit_code is None and NS is None:
            wpid, st = os.waitpid(pid, os.WNOHANG)
            if wpid:
                exit_code, reaped = os.waitstatus_to_exitcode(st), True
        if exit_code is not None and grace_until is None:
            grace_until = now + 0.2   # background holders of the pipes (flat mode) get little time
            if NS is not None:
                break   # init is gone or going: the kernel kills the rest of the namespace
        if exit_code is None and now >= deadline:
            status = "timeout"
            break
        if grace_until is not None and now >= grace_until:
            break
        if disk_budget is not None and exit_code is None and now >= next_disk:
            next_disk = now + 2 * POLL_S
            used, entries = dir_usage(jobdir)
            if used > disk_budget or entries > DISK_ENTRIES:
                limit = "disk"
                break
        if poll and started and exit_code is None and now >= next_poll:
            next_poll = now + POLL_S
            job_pids, cpu_s, rss = proc_usage(root, skip)
            procs = max(procs, len(job_pids))
            if cpu_s > cpu_budget:
                status, limit = "timeout", "cpu"
                break
            if mem_budget and len(job_pids) > 1 and rss > mem_budget:
                limit = "memory"
                break
        limit_t = deadline if grace_until is None else grace_until
        wait = max(0.0, min(limit_t - now, next_poll - now if poll and started else 0.05,
                            next_disk - now if disk_budget is not None else 0.05, 0.05))
        ready, _, _ = select.select(list(open_fds), [], [], wait)
        for fd in ready:
            i = open_fds[fd]
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                del open_fds[fd]
                continue
            if i < 3:
                caps[i].add(chunk)
                continue
            status_buf += chunk
            if status_buf[:1] == b"S":
                started, status_buf = True, status_buf[1:]
            if len(status_buf) >= 5 and status_buf[:1] == b"E":
                exit_code = struct.unpack("=i", status_buf[1:5])[0]
    # end the job: in a namespace killing its init kills everything in it; flat, kill the child's group and
    # every descendant the scan found (the zygote sweeps whatever is left afterwards)
    try:
        os.kill(pid, signal.SIGKILL)
        if NS is None:
            os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    if NS is None and poll and ISOLATE:
        for p in proc_usage(root, skip)[0]:
            try:
                os.kill(p, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
    if not reaped:
        _, st = os.waitpid(pid, 0)
        if exit_code is None:
            exit_code = os.waitstatus_to_exitcode(st)
    for fd in list(open_fds):   # drain what was written before the kill, without blocking
        if open_fds[fd] == 3:
            continue
        try:
            while True:
                r, _, _ = select.select([fd], [], [], 0)
                if not r:
                    break
                chunk = os.read(fd, 1 << 16)
                if not chunk:
                    break
                caps[open_fds[fd]].add(chunk)
        except OSError:
            pass
    for r, _ in pipes:
        os.close(r)
    if status_r is not None:
        os.close(status_r)
    file_head = read_result_file(jobdir, job.get("result_file"))
    return {"status": status, "exit": exit_code, "limit": limit, "wall_s": round(time.monotonic() - t0, 4),
            "cpu_s": round(cpu_s, 3), "procs": procs,
            "results": caps[0].text(), "results_truncated": caps[0].dropped > 0,
            "stdout": caps[1].text(), "stdout_truncated": caps[1].dropped > 0,
            "stderr": caps[2].text(), "file": file_head}


def wipe(path):
    """Remove everything beneath `path` (not `path` itself), whatever a job made of it: directories of mode
    000, names with newlines or bytes that are not UTF-8, symlinks (never followed), fifos, sockets, deep
    nesting (directory fds, no recursion, no PATH_MAX), in time linear in the number of entries. -> True if
    `path` is an empty directory afterwards (anything else: the zygote gives the sandbox up)."""
    def scan(fd):   # unlink what is not a directory, rmdir empty ones, -> names of the others
        later = []
        with os.scandir(fd) as it:
            for entry in it:
                try:
                    if not entry.is_dir(follow_symlinks=False):
                        os.unlink(entry.name, dir_fd=fd)
                        continue
                    try:
                        os.rmdir(entry.name, dir_fd=fd)
                    except OSError:
                        later.append(entry.name)
                except FileNotFoundError:
                    pass
        return later

    stack = []
    try:
        os.chmod(path, 0o700)
        top = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        stack.append((top, None, scan(top)))
        while stack:
            fd, name, later = stack[-1]
            if later:
                sub_name = later.pop()
                os.chmod(sub_name, 0o700, dir_fd=fd)   # a dir of mode 000 can be neither listed nor emptied
                sub = os.open(sub_name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
                stack.append((sub, sub_name, []))
                stack[-1][2].extend(scan(sub))
                continue
            stack.pop()
            os.close(fd)
            if stack:
                os.rmdir(name, dir_fd=stack[-1][0])
        return not os.listdir(path)
    except OSError:
        for fd, _, _ in stack:
            try:
                os.close(fd)
            except OSError:
                pass
        return False


def cleanup(base, jobdir, sweep, private_dev):
    """Between jobs: SIGKILL every other process in our pid namespace / uid, reap them (we are a child
    subreaper, and zombies would count against RLIMIT_NPROC), and wipe the writable places. -> False if the
    job dir could not be emptied (the zygote then exits and the host starts a fresh sandbox)."""
    if sweep:
        try:
            os.kill(-1, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    reap_until = time.monotonic() + 5.0
    while True:
        try:
            wpid, _ = os.waitpid(-1, 0 if sweep and time.monotonic() < reap_until else os.WNOHANG)
            if wpid == 0:
                break
        except ChildProcessError:
            break
    ok = wipe(jobdir)
    for d in (base, "/dev/shm") if private_dev else (base,):   # never the host's /dev/shm
        try:
            entries = os.listdir(d)
        except OSError:
            continue
        for name in entries:
            path = os.path.join(d, name)
            if path == jobdir:
                continue
            try:
                if os.path.isdir(path) and not os.path.islink(path):
                    ok = wipe(path) and ok
                    os.rmdir(path)
                else:
                    os.unlink(path)
            except OSError:
                ok = False
    return ok


def main():
    cmd_fd, out_fd = os.dup(0), os.dup(1)
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    cfg = read_frame(cmd_fd)
    if cfg is None:
        return
    for name in PREIMPORT:
        try:
            __import__(name)
        except ImportError:
            pass
    try:   # nobody else with our uid may ptrace us or open /proc/<zygote>/mem|fd
        lib = libc()
        lib.prctl(4, 0, 0, 0, 0)    # PR_SET_DUMPABLE = 4
        lib.prctl(36, 1, 0, 0, 0)   # PR_SET_CHILD_SUBREAPER = 36: orphans of a job come back to us
    except Exception:
        pass
    base = cfg["workdir"]
    jobdir = os.path.join(base, "job")
    os.makedirs(jobdir, 0o700, exist_ok=True)
    # test knobs (the host sets them only in tests that show what each layer stops): "isolate": False turns
    # every per-job layer off, cleanup included; "seccomp": False turns seccomp and Landlock off
    global NS, SECCOMP_INSTALL, LANDLOCK_FD, BASE_RSS, ISOLATE, DISK_MB
    ISOLATE = bool(cfg.get("isolate", True))
    DISK_MB = int(cfg.get("tmp_mb", DISK_MB))
    layers = ISOLATE and cfg.get("seccomp", True)
    if ISOLATE and cfg.get("namespaces", True):
        NS, namespaces = ns_prepare(jobdir, not cfg.get("private_net", False), int(cfg.get("tmp_mb", 64)))
    else:
        namespaces = "off: disabled by the host"
    if layers:
        # inet sockets only where no other job shares the network namespace (bwrap's, or the job's own)
        inet = bool(cfg.get("private_net")) or bool(NS and NS["flags"] & CLONE_NEWNET)
        install, seccomp = seccomp_prepare(inet)
        if install is not None:
            try:
                seccomp = seccomp_probe(install)
            except OSError as e:   # fork refused: grade unfiltered rather than not at all
                seccomp = "off: probe failed (%s)" % type(e).__name__
            SECCOMP_INSTALL = install if seccomp == "on" else None
        # with namespaces the tmpfs is mounted on the job dir: the rule must name the dir above it
        fd, landlock = landlock_prepare(base if NS else jobdir, cfg.get("forbid", ()))
        if fd is not None:
            try:
                landlock = landlock_probe(fd, jobdir, None if NS else os.path.join(base, ".landlock-outside")) \
                    or landlock
            except OSError as e:
                landlock = "off: probe failed (%s)" % type(e).__name__
            if landlock.startswith("on"):
                LANDLOCK_FD = fd
            else:
                os.close(fd)
    else:
        seccomp = landlock = "off: disabled by the host"
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    # Everything the zygote allocated so far is shared copy-on-write with each runner/child; a garbage
    # collection there would touch (and so copy) all of it, ~1.3 ms per job. Frozen objects are never scanned.
    import gc
    gc.collect()
    gc.freeze()
    try:
        with open("/proc/self/stat", "rb") as f:
            BASE_RSS = int(f.read().rsplit(b")", 1)[1].split()[21])
    except (OSError, ValueError, IndexError):
        pass
    os.chdir(base)
    write_frame(out_fd, {"ready": True, "pid": os.getpid(), "uid": os.getuid(),
                         "python": sys.version.split()[0], "seccomp": seccomp, "landlock": landlock,
                         "namespaces": namespaces})
    sweep = bool(cfg.get("sweep", False)) and ISOLATE
    while True:
        # The zygote never reads job data: a fresh runner, forked from our pristine memory, reads ONE job,
        # supervises its child and replies. So no job can find another job's code, canonical solution or
        # return values in leftover heap memory (GRPO sends many responses to the same problem in a row).
        try:
            select.select([cmd_fd], [], [])
        except InterruptedError:
            continue
        runner = os.fork()
        if runner == 0:
            code = 0
            try:
                job = read_frame(cmd_fd)
                if job is None:
                    os._exit(3)
                if NS is None and not sweep and ISOLATE:
                    # no pid namespace and no uid of our own: a process the job left behind could not be
                    # swept up and would share the grader's uid, so the job may not create processes
                    job["nproc"] = job["nproc_rlimit"] = 1
                else:   # the runner and init (or zygote) count against the same limit
                    job["nproc_rlimit"] = int(job["nproc"]) + 2
                try:
                    reply = run_job(job, base, jobdir)
                except Exception as e:   # a harness bug must still answer
                    reply = {"status": "error", "error": "%s: %s" % (type(e).__name__, e)}
                write_frame(out_fd, reply)
            except BaseException:
                code = 4
            os._exit(code)
        _, st = os.waitpid(runner, 0)
        status = os.waitstatus_to_exitcode(st)
        clean = cleanup(base, jobdir, sweep, cfg.get("private_dev", False)) if ISOLATE else True
        if status != 0 or not clean:   # EOF from the host (3), a runner killed mid-reply, or a dir we cannot
            return                     # empty: the stream or the sandbox is unusable, the host starts anew


if __name__ == "__main__":
    main()
