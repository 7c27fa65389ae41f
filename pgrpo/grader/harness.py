"""The code that runs INSIDE the sandbox: a zygote that forks a runner and a child per job.

This file is never imported by the grader. `sandbox.py` reads its source and starts it with
`python -I -S -c <source>` (inside bubblewrap when available), so it must stay standard-library only and
self-contained. The zygote imports the modules problem setup code uses once and then never touches job
data: per job it forks a runner (a pristine copy of itself) that reads one job frame from the stdin pipe,
forks the child that runs model code (own session/process group, rlimits, private working dir), enforces
the wall limit, collects capped outputs and writes the reply. When the runner is done the zygote kills
everything else left in the sandbox, reaps it and wipes the writable dirs. No interpreter start is paid
per response, and nothing a response does (processes, files, heap remnants) reaches a later job.
The child installs a seccomp filter as its last step before model code (see `seccomp_program`): model code
and its descendants cannot send signals to, ptrace or read/write the memory of any process, nor open a Unix
socket; before it, Landlock limits file writes to the job dir (and /dev).

Trust: everything here is UNTRUSTED once model code runs. Model code shares the child process with the
job logic and can rewrite anything in it, including what it reports. That is fine by construction: the
child reports return values (plain data) for test inputs, and only the trusted grader knows the expected
outputs; it compares them outside. Reports are claims, never verdicts.

Frames on the zygote's pipes: 4-byte big-endian length + UTF-8 JSON.
Job:   {"kind": "gt"|"check", "code", "setup_code", "tests": [{"fn", "args": [src], "kwargs": {k: src}}],
        "variant": "own"|"arb"|"canon", "mode", "method", "canonical", "test_func": {"form", "parent", "src"}
        or None, "standalone": bool, "time_limit", "mem_mb", "fsize_mb", "nproc", "result_file", "out_cap",
        "sentinel_class", "sentinel_attr", "run_tests_func"}  (check jobs: see "Semantics of a job" below)
Config (first frame): {"workdir", "sweep", "private_dev", "seccomp": bool (False only in tests)};
ready frame: {"ready", "pid", "uid", "python", "seccomp": "on" | "off: <why>"}.
Reply: {"status": "ok"|"timeout", "exit": returncode (negative = signal), "results": child JSON lines
        (text, capped), "stdout": head, "stderr": head, "stdout_truncated", "file": result file head or
        None, "wall_s"}
"""
import json
import os
import resource
import select
import shutil
import signal
import stat
import struct
import sys
import time

PREIMPORT = ("typing", "functools", "collections", "itertools", "heapq", "bisect", "string", "operator",
             "math", "random", "datetime", "re", "copy", "ast", "array", "fractions", "decimal",
             "statistics", "sortedcontainers")
RESULT_CAP = 32 << 20     # bytes of child result lines kept
SECCOMP_INSTALL = None    # set by the zygote when the startup probe saw the filter work
LANDLOCK_RESTRICT = None  # likewise for the landlock write restriction
ERR_CAP = 4096
MAX_FRAME = 256 << 20


# ----------------------------------------------------------------------------- framing

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


def setup_child(job, res_w, out_w, err_w, jobdir):
    os.setsid()
    os.chdir(jobdir)
    tl = float(job["time_limit"])
    cpu = int(tl) + 1
    limits = [(resource.RLIMIT_CPU, (cpu, cpu + 1)), (resource.RLIMIT_CORE, (0, 0)),
              (resource.RLIMIT_FSIZE, (job["fsize_mb"] << 20,) * 2),
              (resource.RLIMIT_NPROC, (job["nproc"],) * 2)]
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
    os.closerange(4, 65536)
    sys.stdout = open(1, "w", encoding="utf-8", errors="replace", closefd=False)
    sys.stderr = open(2, "w", encoding="utf-8", errors="replace", closefd=False)
    sys.stdin = open(0, "r", closefd=False)
    return res_fd


# ----------------------------------------------------------------------------- seccomp (job child only)

# Why: without bwrap and without a uid drop (the docker-compose grader: one unprivileged uid, no user
# namespaces), the server, the zygotes and every job share one uid, so a response could `kill(-1)`,
# `kill(os.getppid())` or SIGKILL the server pid it finds in /proc and take the grading service down, or
# ptrace / process_vm_writev its way into another process. The per-job child therefore installs a
# seccomp-BPF filter right before model code runs: these syscalls fail with EPERM for the child and all
# its descendants (filters are inherited and cannot be removed). Everything else is allowed. The wall-time
# kill and the sweep come from the runner / zygote, which never run under the filter.
# Numbers: x86_64 from asm/unistd_64.h, aarch64 from asm-generic/unistd.h (checked against the headers).
SECCOMP_DENY = {
    "x86_64": {"kill": 62, "tkill": 200, "tgkill": 234, "rt_sigqueueinfo": 129, "rt_tgsigqueueinfo": 297,
               "ptrace": 101, "process_vm_readv": 310, "process_vm_writev": 311, "pidfd_send_signal": 424,
               "pidfd_open": 434, "io_uring_setup": 425},
    "aarch64": {"kill": 129, "tkill": 130, "tgkill": 131, "rt_sigqueueinfo": 138, "rt_tgsigqueueinfo": 240,
                "ptrace": 117, "process_vm_readv": 270, "process_vm_writev": 271, "pidfd_send_signal": 424,
                "pidfd_open": 434, "io_uring_setup": 425},
}
# socket(AF_UNIX, ...) is refused too: without bwrap the grader's own socket (and any other Unix socket the
# container has) would be reachable, and a job could flood the service with requests that outlive it.
# socketpair() stays allowed (asyncio, multiprocessing pipes). io_uring is refused because its SOCKET /
# CONNECT operations would bypass this filter.
SECCOMP_SOCKET = {"x86_64": 41, "aarch64": 198}
AF_UNIX = 1
AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}   # EM_* | __AUDIT_ARCH_64BIT | __AUDIT_ARCH_LE
X32_SYSCALL_BIT = 0x40000000


def seccomp_program(machine):
    """The BPF program as bytes (struct sock_filter[]). A syscall of a foreign arch (i386 `int 0x80` on
    x86_64, aarch32 on aarch64) or of the x32 ABI gets EPERM wholesale: those tables number kill & co
    differently, and legitimate Python code never uses them."""
    LD_ABS, JEQ, JGE, RET = 0x20, 0x15, 0x35, 0x06   # BPF_LD|W|ABS, BPF_JMP|JEQ|K, BPF_JMP|JGE|K, BPF_RET|K
    ALLOW, DENY = 0x7FFF0000, 0x00050000 | 1          # SECCOMP_RET_ALLOW, SECCOMP_RET_ERRNO | EPERM
    checks = [(JGE, X32_SYSCALL_BIT)] if machine == "x86_64" else []
    checks += [(JEQ, nr) for nr in sorted(SECCOMP_DENY[machine].values())]
    # layout: 0 ld arch | 1 arch? | 2 ld nr | checks -> DENY | socket? -> SOCK | ALLOW | SOCK: ld args[0] |
    #         AF_UNIX? -> DENY | ALLOW | DENY
    sock_at = 3 + len(checks) + 2
    deny_at = sock_at + 3
    prog = [(LD_ABS, 0, 0, 4),                      # A = seccomp_data.arch
            (JEQ, 0, deny_at - 2, AUDIT_ARCH[machine]),
            (LD_ABS, 0, 0, 0)]                      # A = seccomp_data.nr
    for op, k in checks:
        prog.append((op, deny_at - len(prog) - 1, 0, k))
    prog.append((JEQ, sock_at - len(prog) - 1, 0, SECCOMP_SOCKET[machine]))
    prog.append((RET, 0, 0, ALLOW))
    prog.append((LD_ABS, 0, 0, 16))                 # A = low 32 bits of args[0] (little-endian): the domain
    prog.append((JEQ, deny_at - len(prog) - 1, 0, AF_UNIX))
    prog.append((RET, 0, 0, ALLOW))
    prog.append((RET, 0, 0, DENY))
    assert len(prog) == deny_at + 1 and prog[sock_at][3] == 16
    return b"".join(struct.pack("=HBBI", *ins) for ins in prog)


def seccomp_prepare():
    """-> (install, status). Built once in the zygote, so a job pays two prctl calls; `install()` raises
    OSError if the kernel refuses. status is "on" or "off: <why>"."""
    machine = os.uname().machine
    if machine not in SECCOMP_DENY or struct.calcsize("P") != 8:
        return None, "off: no filter for this architecture (%s)" % machine
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        prctl = libc.prctl
        code = seccomp_program(machine)
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
    """Install the filter in a throwaway child and check that kill() really fails: -> status string."""
    def kill_blocked():
        try:
            os.kill(os.getpid(), 0)
        except PermissionError:
            return True
        return False

    code = _probe_in_child(install, kill_blocked)
    if code == 0:
        return "on"
    if code >= 100:
        return "off: the kernel refused the filter (%s)" % os.strerror(code - 100)
    return "off: the filter did not block kill() (exit %d)" % code


# ----------------------------------------------------------------------------- landlock (job child only)

# Why: seccomp cannot look at paths. Without bwrap a job shares the grader's uid and could unlink or
# replace the grader's socket (/sock/grader.sock) or fill places outside its own dir. Landlock (Linux 5.13+,
# unprivileged) lets the child give up every write-ish file right except beneath its own job dir; writes to
# already-open fds and to /dev (e.g. /dev/null) still work, reads are untouched. Best effort, like seccomp.
LL_CREATE, LL_ADD_RULE, LL_RESTRICT = 444, 445, 446   # same numbers on x86_64 and aarch64 (asm-generic)
LL_WRITE_FILE, LL_TRUNCATE = 1 << 1, 1 << 14
LL_WRITES = LL_WRITE_FILE | sum(1 << b for b in range(4, 13))   # remove_dir/file, make_char..make_sym


def landlock_prepare():
    """-> (restrict(jobdir), status)."""
    if os.uname().machine not in SECCOMP_DENY or struct.calcsize("P") != 8:
        return None, "off: no landlock numbers for this architecture"
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        syscall = libc.syscall
        syscall.restype = ctypes.c_long
        abi = syscall(ctypes.c_long(LL_CREATE), None, ctypes.c_size_t(0), ctypes.c_uint32(1))   # VERSION
        if abi < 1:
            err = ctypes.get_errno()
            return None, "off: landlock unavailable (%s)" % os.strerror(err)
    except Exception as e:
        return None, "off: cannot call landlock (%s)" % type(e).__name__
    handled = LL_WRITES | (1 << 13 if abi >= 2 else 0) | (LL_TRUNCATE if abi >= 3 else 0)   # + refer, truncate
    dev_access = LL_WRITE_FILE | (LL_TRUNCATE if abi >= 3 else 0)

    def check(r):
        if r < 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
        return r

    def restrict(jobdir):
        attr = ctypes.c_uint64(handled)   # struct landlock_ruleset_attr, first field only
        rfd = check(syscall(ctypes.c_long(LL_CREATE), ctypes.byref(attr), ctypes.c_size_t(8), ctypes.c_uint32(0)))
        try:
            for path, access in ((jobdir, handled), ("/dev", dev_access)):
                try:
                    pfd = os.open(path, os.O_PATH | os.O_CLOEXEC)
                except OSError:
                    continue
                try:   # struct landlock_path_beneath_attr (packed): u64 allowed_access, s32 parent_fd
                    rule = ctypes.create_string_buffer(struct.pack("=Qi", access, pfd), 12)
                    check(syscall(ctypes.c_long(LL_ADD_RULE), ctypes.c_int(rfd), ctypes.c_int(1), rule,
                                  ctypes.c_uint32(0)))
                finally:
                    os.close(pfd)
            check(libc.prctl(ctypes.c_ulong(38), ctypes.c_ulong(1), ctypes.c_ulong(0), ctypes.c_ulong(0),
                             ctypes.c_ulong(0)))   # PR_SET_NO_NEW_PRIVS: required before restrict_self
            check(syscall(ctypes.c_long(LL_RESTRICT), ctypes.c_int(rfd), ctypes.c_uint32(0)))
        finally:
            os.close(rfd)
    return restrict, "on (abi %d)" % abi


def landlock_probe(restrict, base):
    """Restrict a throwaway child to a scratch dir under `base` and check a write next to it fails."""
    scratch = os.path.join(base, ".landlock-probe")
    os.makedirs(scratch, exist_ok=True)

    def write_blocked():
        open(os.path.join(scratch, "inside"), "w").close()
        try:
            open(os.path.join(base, ".landlock-outside"), "w").close()
        except PermissionError:
            return True
        return False

    code = _probe_in_child(lambda: restrict(scratch), write_blocked)
    shutil.rmtree(scratch, ignore_errors=True)
    try:
        os.unlink(os.path.join(base, ".landlock-outside"))
    except OSError:
        pass
    if code == 0:
        return None
    if code >= 100:
        return "off: the kernel refused the ruleset (%s)" % os.strerror(code - 100)
    return "off: the ruleset did not block a write (exit %d)" % code


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


def remove_tree(path):
    shutil.rmtree(path, ignore_errors=True)


def run_job(job, base, seq):
    jobdir = os.path.join(base, "job%d" % seq)
    remove_tree(jobdir)
    os.mkdir(jobdir, 0o700)
    pipes = [os.pipe() for _ in range(3)]   # results, stdout, stderr
    t0 = time.monotonic()
    pid = os.fork()
    if pid == 0:
        try:
            for r, _ in pipes:
                os.close(r)
            res_fd = setup_child(job, pipes[0][1], pipes[1][1], pipes[2][1], jobdir)
            if LANDLOCK_RESTRICT is not None:   # writes only beneath the job dir (and to /dev)
                try:
                    LANDLOCK_RESTRICT(jobdir)
                except OSError:
                    pass   # the startup probe saw it work; a refusal now still grades (health says how)
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
    for _, w in pipes:
        os.close(w)
    caps = [RESULT_CAP, int(job.get("out_cap", 1 << 20)), ERR_CAP]
    bufs = [bytearray(), bytearray(), bytearray()]
    truncated = [False, False, False]
    open_fds = {pipes[i][0]: i for i in range(3)}
    deadline = t0 + float(job["time_limit"])
    status, exit_code = "ok", None
    grace_until = None
    while open_fds:
        now = time.monotonic()
        if exit_code is None:
            wpid, st = os.waitpid(pid, os.WNOHANG)
            if wpid:
                exit_code = os.waitstatus_to_exitcode(st)
                grace_until = now + 0.2   # background holders of the pipes get little time
        if exit_code is None and now >= deadline:
            status = "timeout"
            break
        if grace_until is not None and now >= grace_until:
            break
        limit = deadline if grace_until is None else grace_until
        ready, _, _ = select.select(list(open_fds), [], [], max(0.0, min(limit - now, 0.05)))
        for fd in ready:
            i = open_fds[fd]
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                del open_fds[fd]
                continue
            room = caps[i] - len(bufs[i])
            if room > 0:
                bufs[i] += chunk[:room]
            if len(chunk) > room:
                truncated[i] = True
    # kill the job's process group; leftovers that left the group are swept by the zygote afterwards
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    if exit_code is None:
        _, st = os.waitpid(pid, 0)
        exit_code = os.waitstatus_to_exitcode(st)
    for fd in open_fds:   # drain what was written before the kill, without blocking
        try:
            while True:
                r, _, _ = select.select([fd], [], [], 0)
                if not r:
                    break
                chunk = os.read(fd, 1 << 16)
                if not chunk:
                    break
                i = open_fds[fd]
                room = caps[i] - len(bufs[i])
                if room > 0:
                    bufs[i] += chunk[:room]
                if len(chunk) > room:
                    truncated[i] = True
        except OSError:
            pass
    for r, _ in pipes:
        os.close(r)
    file_head = read_result_file(jobdir, job.get("result_file"))
    remove_tree(jobdir)
    return {"status": status, "exit": exit_code, "wall_s": round(time.monotonic() - t0, 4),
            "results": bufs[0].decode("utf-8", "replace"), "results_truncated": truncated[0],
            "stdout": bufs[1].decode("utf-8", "replace"), "stdout_truncated": truncated[1],
            "stderr": bufs[2].decode("utf-8", "replace"), "file": file_head}


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
        import ctypes
        libc = ctypes.CDLL(None)
        libc.prctl(4, 0, 0, 0, 0)    # PR_SET_DUMPABLE = 4
        libc.prctl(36, 1, 0, 0, 0)   # PR_SET_CHILD_SUBREAPER = 36: orphans of a job come back to us
    except Exception:
        pass
    global SECCOMP_INSTALL
    if cfg.get("seccomp", True):
        install, seccomp = seccomp_prepare()
        if install is not None:
            try:
                seccomp = seccomp_probe(install)
            except OSError as e:   # fork refused: grade unfiltered rather than not at all
                seccomp = "off: probe failed (%s)" % type(e).__name__
            SECCOMP_INSTALL = install if seccomp == "on" else None
    else:
        seccomp = "off: disabled by the host"
    global LANDLOCK_RESTRICT
    if cfg.get("seccomp", True):
        restrict, landlock = landlock_prepare()
        if restrict is not None:
            try:
                landlock = landlock_probe(restrict, cfg["workdir"]) or landlock
            except OSError as e:
                landlock = "off: probe failed (%s)" % type(e).__name__
            LANDLOCK_RESTRICT = restrict if landlock.startswith("on") else None
    else:
        landlock = "off: disabled by the host"
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    # Everything the zygote allocated so far is shared copy-on-write with each runner/child; a garbage
    # collection there would touch (and so copy) all of it, ~1.3 ms per job. Frozen objects are never scanned.
    import gc
    gc.collect()
    gc.freeze()
    base = cfg["workdir"]
    os.chdir(base)
    write_frame(out_fd, {"ready": True, "pid": os.getpid(), "uid": os.getuid(),
                         "python": sys.version.split()[0], "seccomp": seccomp, "landlock": landlock})
    sweep = bool(cfg.get("sweep", False))
    seq = 0
    while True:
        # The zygote never reads job data: a fresh runner, forked from our pristine memory, reads ONE job,
        # supervises its child and replies. So no job can find another job's code, canonical solution or
        # return values in leftover heap memory (GRPO sends many responses to the same problem in a row).
        try:
            select.select([cmd_fd], [], [])
        except InterruptedError:
            continue
        seq += 1
        runner = os.fork()
        if runner == 0:
            code = 0
            try:
                job = read_frame(cmd_fd)
                if job is None:
                    os._exit(3)
                if not sweep:
                    # no pid namespace and no uid of our own: a process the job left behind could not be
                    # swept up and would share the grader's uid, so the job may not create processes
                    job["nproc"] = 1
                try:
                    reply = run_job(job, base, seq)
                except Exception as e:   # a harness bug must still answer
                    reply = {"status": "error", "error": "%s: %s" % (type(e).__name__, e)}
                write_frame(out_fd, reply)
            except BaseException:
                code = 4
            os._exit(code)
        _, st = os.waitpid(runner, 0)
        status = os.waitstatus_to_exitcode(st)
        cleanup(base, sweep, cfg.get("private_dev", False))
        if status != 0:   # EOF from the host (3), or the runner was killed mid-reply: the stream is unusable
            return


def cleanup(base, sweep, private_dev):
    """Between jobs: SIGKILL every other process in our pid namespace / uid, reap them (we are a child
    subreaper, and zombies would count against RLIMIT_NPROC), and wipe the writable places."""
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
    for d in (base, "/dev/shm") if private_dev else (base,):   # never the host's /dev/shm
        try:
            entries = os.listdir(d)
        except OSError:
            continue
        for name in entries:
            path = os.path.join(d, name)
            try:
                if os.path.isdir(path) and not os.path.islink(path):
                    remove_tree(path)
                else:
                    os.unlink(path)
            except OSError:
                pass


if __name__ == "__main__":
    main()
