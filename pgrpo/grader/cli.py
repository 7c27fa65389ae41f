"""`pgrpo grade --problems P.jsonl --responses R.jsonl [--mode MODE] [--out OUT.jsonl] [--socket PATH]`

Response rows: {"id": <problem id>, "response": str, "mode": optional per-row loophole mode}. Output: one
JSON line per response, in input order (id, label, format_ok, can_compile, gt_pass, gt_pass_rate,
loophole_pass, harmful_tests, reward, error, elapsed_s, ...). With --out the file is written to a temp
name and renamed, so a crash never leaves half a file; without it lines go to stdout. Without --socket a
private grader is started for the run.
"""
import argparse
import json
import os
import sys
import tempfile

from pgrpo.data.problems import load_problems
from pgrpo.data.prompts import LOOPHOLE_MODES
from pgrpo.errors import UserError
from pgrpo.files import check_out_file, utf8_lines
from pgrpo.grader.client import GraderClient, GraderError, LocalGrader

CHUNK = 256


def read_responses(path, problems_by_id, default_mode):
    lines = utf8_lines(path, "responses file")
    items = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            d = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
        if type(d) is not dict or "id" not in d or type(d.get("response")) is not str:
            raise UserError(f"{where}: a response row needs an \"id\" and a string \"response\"")
        pid = str(d["id"])
        if pid not in problems_by_id:
            raise UserError(f"{where}: unknown problem id {d['id']!r} (not in the problems file)")
        mode = d.get("mode", default_mode)
        if mode not in LOOPHOLE_MODES:
            raise UserError(f"{where}: unknown mode {mode!r}; choose one of {', '.join(LOOPHOLE_MODES)}")
        items.append({"problem": problems_by_id[pid], "response": d["response"], "mode": mode, "id": d["id"]})
    if not items:
        raise UserError(f"{path}: no responses in file")
    return items


def cli_grade(argv):
    ap = argparse.ArgumentParser(prog="pgrpo grade", description=__doc__.split("\n\n")[0])
    ap.add_argument("--problems", required=True)
    ap.add_argument("--responses", required=True)
    ap.add_argument("--mode", default="none",
                    help=f"loophole mode of rows that name none (default: none, i.e. no loophole counts; training's "
                         f"presets use run_tests); one of {', '.join(LOOPHOLE_MODES)}")
    ap.add_argument("--out", default=None, help="write the result rows here (temp + rename) instead of stdout")
    ap.add_argument("--socket", default=None, help="a running grader; default: start one for this run")
    ap.add_argument("--workers", type=int, default=max(1, os.cpu_count() or 1))
    ap.add_argument("--time-limit", type=float, default=5.0,
                    help="seconds of wall time per problem run (default 5, the trainer's grader_time_limit_s)")
    args = ap.parse_args(argv)
    if args.mode not in LOOPHOLE_MODES:
        raise UserError(f"unknown --mode {args.mode!r}; choose one of {', '.join(LOOPHOLE_MODES)}")
    if args.time_limit <= 0:
        raise UserError(f"--time-limit must be > 0, got {args.time_limit:g}")
    if args.out:
        check_out_file(args.out)   # before any grading: a bad --out must not cost a whole grading pass
    if args.socket and not os.path.isdir(os.path.dirname(os.path.abspath(args.socket))):
        raise UserError(f"--socket {args.socket}: directory {os.path.dirname(os.path.abspath(args.socket))} does not exist")
    problems = {p.id: p for p in load_problems(args.problems)}
    items = read_responses(args.responses, problems, args.mode)
    config = {"time_limit": args.time_limit}

    def run(client):
        out = []
        for k in range(0, len(items), CHUNK):
            out += client.grade(items[k:k + CHUNK], config=config)
        return out

    try:
        if args.socket:
            results = run(GraderClient(args.socket))
        else:
            with LocalGrader(workers=args.workers) as g:
                results = run(g.client())
    except GraderError as e:
        raise UserError(f"grading failed: {e}") from None

    text = "".join(json.dumps(r) + "\n" for r in results)
    if args.out:
        d = os.path.dirname(os.path.abspath(args.out))
        fd, tmp = tempfile.mkstemp(prefix=".grade-", dir=d)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
            os.replace(tmp, args.out)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        counts = {}
        for r in results:
            counts[r["label"]] = counts.get(r["label"], 0) + 1
        print(f"pgrpo grade: {len(results)} responses -> {args.out}: "
              + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())), file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0
