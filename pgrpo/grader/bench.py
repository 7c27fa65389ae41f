"""`pgrpo bench grader`: responses/second of the grader service vs a naive harness, in one run.

Mixed batch over the built-in problems (or --problems FILE), mode run_tests: per problem a correct
response (canonical solution), a wrong one (`return 0`), a hack (wrong + `def run_tests(): pass`), and for
every 16th problem a timeout (infinite loop in the method). Both sides use the same number of parallel
workers and the same per-run time limit.

Naive baselines (what a benchmark harness typically does; neither is sandboxed):
- per-check: a fresh `python -c` per check: one per gt assert (setup + code + that assert, stopping at
  the first failure) plus one for the loophole check (setup + code + `run_tests()`).
- per-response: a fresh `python -c` with all gt asserts, plus one for the loophole check.
- per-response, lean: the same with `python -I -S` (no site import), the cheapest fresh interpreter.
"""
import argparse
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from pgrpo.data.problems import builtin_problems, load_problems
from pgrpo.grader.client import LocalGrader


def mixed_batch(problems):
    items = []
    for k, p in enumerate(problems):
        m = p.method_name
        wrong = f"class Solution:\n    def {m}(self, *args, **kwargs):\n        return 0\n"
        items.append({"problem": p, "response": f"```python\n{p.canonical_solution}\n```", "kind": "correct"})
        items.append({"problem": p, "response": f"```python\n{wrong}```", "kind": "wrong"})
        items.append({"problem": p, "response": f"```python\n{wrong}\ndef run_tests():\n    pass\n```",
                      "kind": "hack"})
        if k % 16 == 0:
            loop = f"class Solution:\n    def {m}(self, *args, **kwargs):\n        while True:\n            pass\n"
            items.append({"problem": p, "response": f"```python\n{loop}```", "kind": "timeout"})
    for it in items:
        it["mode"] = "run_tests"
    return items


def _run_py(src, time_limit, flags=()):
    try:
        r = subprocess.run([sys.executable, *flags, "-c", src], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, timeout=time_limit)
        return r.returncode == 0
    except subprocess.TimeoutExpired:
        return False


def naive_grade(item, time_limit, per_check, flags=()):
    from pgrpo.grader.extract import extract_code
    p = item["problem"]
    code = extract_code(item["response"]) or ""
    prefix = p.setup_code + "\n" + code + "\n"
    if per_check:   # all() stops at the first failure
        gt = all(_run_py(prefix + t, time_limit, flags) for t in p.gt_answer)
    else:
        gt = _run_py(prefix + "\n".join(p.gt_answer), time_limit, flags)
    hack = _run_py(prefix + "run_tests()\n", time_limit, flags)
    return gt, hack


def main(argv):
    ap = argparse.ArgumentParser(prog="pgrpo bench grader", description=__doc__.split("\n\n")[0])
    ap.add_argument("--problems", default=None, help="problem jsonl (default: the built-in set)")
    ap.add_argument("--n-problems", type=int, default=48)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--time-limit", type=float, default=1.0)
    args = ap.parse_args(argv)
    problems = (load_problems(args.problems) if args.problems else builtin_problems())[: args.n_problems]
    items = mixed_batch(problems)
    kinds = {}
    for it in items:
        kinds[it["kind"]] = kinds.get(it["kind"], 0) + 1
    print(f"batch: {len(items)} responses over {len(problems)} problems "
          f"({', '.join(f'{k} {v}' for k, v in kinds.items())}); workers={args.workers}, "
          f"time limit {args.time_limit:g}s")

    with LocalGrader(workers=args.workers) as g:
        client = g.client()
        health = client.health()
        req = [{k: it[k] for k in ("problem", "response", "mode")} for it in items]
        client.grade(req[:4], config={"time_limit": args.time_limit})   # warm-up
        t0 = time.perf_counter()
        results = client.grade(req, config={"time_limit": args.time_limit})
        t_service = time.perf_counter() - t0
    labels = {}
    for r in results:
        labels[r["label"]] = labels.get(r["label"], 0) + 1
    rate = len(items) / t_service
    print(f"service (bwrap={health['sandbox']['bwrap']}): {t_service:.2f}s, {rate:.1f} responses/s; "
          f"labels: {', '.join(f'{k} {v}' for k, v in sorted(labels.items()))}")

    out = {"service_rps": rate}
    baselines = (("per-check", True, ()), ("per-response", False, ()), ("per-response -I -S", False, ("-I", "-S")))
    for name, per_check, flags in baselines:
        t0 = time.perf_counter()
        with ThreadPoolExecutor(args.workers) as ex:
            list(ex.map(lambda it: naive_grade(it, args.time_limit, per_check, flags), items))
        t = time.perf_counter() - t0
        r = len(items) / t
        out[name] = r
        print(f"naive {name} `python -c` baseline ({sys.executable}): {t:.2f}s, {r:.1f} responses/s -> service is "
              f"{rate / r:.1f}x faster")
    return 0
