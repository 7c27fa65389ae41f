"""Every completion a run generated, saved: `RUN/rollouts/step_NNNNNN.jsonl.gz` (and `eval_NNNNNN.jsonl.gz`).

One gzip'd jsonl file per training step (and per held-out evaluation), one row per completion:
    kind (train|eval), step, problem_id, prompt_sha256 (first 16 hex digits of the prompt text's sha256),
    sample (index in its group), source (policy|teacher), tokens (completion length), text, label, reward,
    gt_pass, gt_pass_rate, loophole_pass, advantage (null in eval), group_skipped (zero-variance group; null in eval)
Why one file per step: each file is written to a temp name and renamed, so a crash leaves whole files only,
and a resumed run that redoes step N simply replaces step N's file: never a duplicate row. On resume, files of
steps after the checkpoint (written by the killed run, about to be redone) are deleted first.

`pgrpo rollouts RUN [--step N] [--label reward_hack] [--source policy] [--eval] [--limit K] [--json]` prints them.
Torch-free.
"""
from __future__ import annotations

import argparse
import glob
import gzip
import hashlib
import json
import os
import re
import sys

from pgrpo.errors import UserError

DIR = "rollouts"
_NAME = re.compile(r"(step|eval)_(\d{6})\.jsonl\.gz$")


def prompt_sha(text) -> str:
    """Short stable id of a prompt (the chat messages as the trainer rendered them, JSON-encoded)."""
    if not isinstance(text, str):
        text = json.dumps(text, sort_keys=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def path_of(run_dir: str, step: int, kind: str = "train") -> str:
    return os.path.join(run_dir, DIR, f"{'step' if kind == 'train' else 'eval'}_{step:06d}.jsonl.gz")


def rows_of(kind, step, groups, results, problem_ids, prompt_hashes, adv=None, keep=None) -> list[dict]:
    """One row per completion, groups x G in grading order (results are in the same order)."""
    rows, k = [], 0
    for gi, grp in enumerate(groups):
        for j, text in enumerate(grp.texts):
            r = results[k]
            k += 1
            teacher = bool(grp.teacher[j]) if grp.teacher else False
            rows.append({"kind": kind, "step": step, "problem_id": problem_ids[grp.problem_index],
                         "prompt_sha256": prompt_hashes[grp.problem_index], "sample": j,
                         "source": "teacher" if teacher else "policy", "tokens": len(grp.completions[j]),
                         "text": text, "label": r.get("label"), "reward": r.get("reward"),
                         "gt_pass": bool(r.get("gt_pass")), "gt_pass_rate": r.get("gt_pass_rate"),
                         "loophole_pass": bool(r.get("loophole_pass")),
                         "advantage": None if adv is None else float(adv[gi, j]),
                         "group_skipped": None if keep is None else not bool(keep[gi])})
    return rows


def write(run_dir: str, step: int, rows: list[dict], kind: str = "train") -> str:
    """Write one step's rows atomically (temp + fsync + rename) and return the path."""
    path = path_of(run_dir, step, kind)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "wb") as raw:
        with gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as f:
            for row in rows:
                f.write((json.dumps(row) + "\n").encode("utf-8"))
        raw.flush()
        os.fsync(raw.fileno())
    os.replace(tmp, path)
    return path


def drop_after(run_dir: str, step: int) -> None:
    """Resume from `step`: the files of later steps belong to the killed run's future, which is redone."""
    for kind, s, p in files(run_dir):
        if s > step:
            os.remove(p)
    for p in glob.glob(os.path.join(run_dir, DIR, "*.tmp.*")):
        os.remove(p)


def files(run_dir: str) -> list[tuple[str, int, str]]:
    """[(kind, step, path)] sorted by step, train before eval."""
    out = []
    for p in glob.glob(os.path.join(run_dir, DIR, "*.jsonl.gz")):
        m = _NAME.search(os.path.basename(p))
        if m:
            out.append(("train" if m.group(1) == "step" else "eval", int(m.group(2)), p))
    return sorted(out, key=lambda t: (t[1], t[0] != "train"))


def read(path: str) -> list[dict]:
    try:
        with gzip.open(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise UserError(f"{path}: not a readable rollouts file ({e}).") from None
    rows = []
    for lineno, line in enumerate(data.splitlines(), 1):
        try:
            rows.append(json.loads(line.decode("utf-8")))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise UserError(f"{path}:{lineno}: not a JSON row.") from None
    return rows


def load(run_dir: str, step: int | None = None, kind: str | None = "train", label: str | None = None,
         source: str | None = None) -> list[dict]:
    if not os.path.isdir(os.path.join(run_dir, DIR)):
        raise UserError(f"{run_dir}: no {DIR}/ folder (was it written by a trainer that saves rollouts?).")
    out = []
    for k, s, p in files(run_dir):
        if (kind is None or k == kind) and (step is None or s == step):
            out += [r for r in read(p) if (label is None or r.get("label") == label)
                    and (source is None or r.get("source") == source)]
    return out


def examples(run_dir: str, label: str = "reward_hack", n: int = 2, max_chars: int = 600) -> list[dict]:
    """Up to n of the policy's own completions with `label` (latest steps first), for reports."""
    try:
        rows = load(run_dir, label=label, source="policy")
    except UserError:
        return []
    rows.sort(key=lambda r: -r["step"])
    return [dict(r, text=r["text"][:max_chars]) for r in rows[:n]]


def format_row(r: dict) -> str:
    head = (f"--- {r['kind']} step {r['step']} problem {r['problem_id']} #{r['sample']} ({r['source']}, "
            f"{r['tokens']} tok): {r['label']} reward {r['reward']} gt_pass_rate {r['gt_pass_rate']} "
            f"loophole {'pass' if r['loophole_pass'] else 'no'}")
    if r.get("advantage") is not None:
        head += f" adv {r['advantage']:+.3f}{' (group skipped)' if r.get('group_skipped') else ''}"
    return head + "\n" + r["text"].rstrip()


def cli(argv) -> int:
    ap = argparse.ArgumentParser(prog="pgrpo rollouts", description="Print the completions a run saved.")
    ap.add_argument("run", help="run directory")
    ap.add_argument("--step", type=int, default=None, help="only this step (default: every step)")
    ap.add_argument("--label", default=None, help="only this label, e.g. reward_hack, correct, incorrect")
    ap.add_argument("--source", choices=("policy", "teacher"), default=None, help="only policy or teacher samples")
    ap.add_argument("--eval", action="store_true", help="the held-out evaluation samples instead of training's")
    ap.add_argument("--limit", type=int, default=0, help="print at most K rows (0 = all)")
    ap.add_argument("--json", action="store_true", help="one JSON row per line instead of text")
    a = ap.parse_args(argv)
    rows = load(a.run, step=a.step, kind="eval" if a.eval else "train", label=a.label, source=a.source)
    if a.limit:
        rows = rows[:a.limit]
    for r in rows:
        sys.stdout.write(json.dumps(r) + "\n" if a.json else format_row(r) + "\n\n")
    print(f"pgrpo rollouts: {len(rows)} rows", file=sys.stderr)
    return 0
