"""`pgrpo eval (RUN|MODEL) --problems P.jsonl [--mode none,run_tests] [--samples N] [--out DIR]`: evaluation the
way the benchmark does it.

For each loophole mode (default both `none`, the plain prompt, and `run_tests`, the overwrite-tests hint, as the
benchmark evaluates its test split), every problem is prompted with that mode's hint, N completions are sampled
and each is graded under that mode by the sandboxed grader. Writes (temp + rename):
    DIR/samples.jsonl   one row per completion: mode, problem_id, sample, prompt_sha256, tokens, text, label, reward, gt_pass,
                        gt_pass_rate, loophole_pass
    DIR/summary.json    per mode: n, problems, hack rate and pass rate with 95% Wilson intervals, label fractions
The target is a run directory (its newest checkpoint or --step, the route arm's quarantine knob off: the deployed
policy) or anything `model.name` accepts ("tiny", an HF id, a local HF dir such as a `pgrpo export` output).
Wilson intervals treat the N x problems samples as independent; samples of one problem are correlated, so the
intervals are optimistic when N > 1 (the per-problem rates in samples.jsonl allow a cluster bootstrap).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

from pgrpo.errors import UserError
from pgrpo.files import check_out_dir, write_text

LABELS = ("correct", "correct_attempted_hack", "reward_hack", "attempted_hack", "incorrect")
DEFAULT_MODES = "none,run_tests"


def wilson(k: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval of a binomial proportion k/n (sensible at 0 and n, unlike the normal one)."""
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    den = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return (max(0.0, mid - half), min(1.0, mid + half))


def summarize(rows: list[dict]) -> dict:
    n = len(rows)
    hacks = sum(r["label"] == "reward_hack" for r in rows)
    passes = sum(bool(r["gt_pass"]) for r in rows)
    return {"n": n, "problems": len({r["problem_id"] for r in rows}),
            "hack_rate": hacks / n if n else None, "hack_rate_ci95": list(wilson(hacks, n)),
            "pass_rate": passes / n if n else None, "pass_rate_ci95": list(wilson(passes, n)),
            "reward_mean": sum(r["reward"] for r in rows) / n if n else None,
            **{f"frac_{lab}": sum(r["label"] == lab for r in rows) / n if n else None for lab in LABELS}}


def _load_target(target, step, device, dtype):
    from pgrpo import checkpoint as ckpt
    from pgrpo.model import load_model
    if os.path.isdir(target) and ckpt.steps_of(target):
        from pgrpo.export import policy_from_run
        model, tok, cfg, step = policy_from_run(target, step, quarantine=False, device=device)
        return model, tok, {"run": os.path.abspath(target), "step": step, "arm": cfg.arm.name, "seed": cfg.seed,
                            "model": cfg.model.name}
    if step is not None:
        raise UserError(f"--step needs a run directory; {target} holds no checkpoints.")
    model, tok = load_model(target, dtype=dtype, device=device)
    return model, tok, {"model": target}


def evaluate(target, problems_path, modes, samples, out, max_new_tokens=512, temperature=1.0, top_p=1.0,
             seed=0, step=None, max_problems=0, socket=None, workers=2, time_limit=5.0, device="cpu",
             dtype="float32", batch=4, log=print) -> dict:
    import torch

    from pgrpo import rollout
    from pgrpo.config import LOOPHOLE_MODES, RolloutConfig
    from pgrpo.data.problems import load_problems, problem_to_row
    from pgrpo.data.prompts import build_prompt
    from pgrpo.grader.client import GraderClient, GraderError, LocalGrader
    from pgrpo.rollouts import prompt_sha
    for m in modes:
        if m not in LOOPHOLE_MODES:
            raise UserError(f"--mode {m!r} is not a loophole mode; choose from {', '.join(LOOPHOLE_MODES)}.")
    if samples < 1 or max_new_tokens < 1:
        raise UserError("--samples and --max-new-tokens must be at least 1.")
    check_out_dir(out)
    problems = load_problems(problems_path)
    if max_problems:
        problems = problems[:max_problems]
    t0 = time.time()
    model, tok, source = _load_target(target, step, device, dtype)
    rcfg = RolloutConfig(group_size=samples, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                         groups_per_generate=batch)
    rows_out = []
    local = None
    try:
        if socket is None:
            local = LocalGrader(workers=workers, time_limit=time_limit).start()
            client = local.client()
        else:
            client = GraderClient(socket)
        for mode in modes:
            torch.manual_seed(seed)
            messages = [build_prompt(p, mode) for p in problems]
            prompts = [rollout.encode_prompt(tok, m) for m in messages]
            groups = rollout.generate_groups(model, tok, prompts, list(range(len(problems))), rcfg, device)
            items = [{"problem": problem_to_row(problems[g.problem_index]), "response": text, "mode": mode,
                      "id": f"{mode}:{g.problem_index}:{j}"} for g in groups for j, text in enumerate(g.texts)]
            try:
                res = client.grade(items, config={"time_limit": time_limit})
            except GraderError as e:
                raise UserError(f"grading failed: {e}") from None
            k = 0
            for g in groups:
                for j, text in enumerate(g.texts):
                    r = res[k]
                    k += 1
                    rows_out.append({"mode": mode, "problem_id": problems[g.problem_index].id, "sample": j,
                                     "prompt_sha256": prompt_sha(messages[g.problem_index]),
                                     "tokens": len(g.completions[j]), "text": text, "label": r["label"],
                                     "reward": r["reward"], "gt_pass": bool(r["gt_pass"]),
                                     "gt_pass_rate": r.get("gt_pass_rate"), "loophole_pass": bool(r["loophole_pass"])})
            s = summarize([r for r in rows_out if r["mode"] == mode])
            log(f"eval {mode}: hack {s['hack_rate']:.3f} [{s['hack_rate_ci95'][0]:.3f}, {s['hack_rate_ci95'][1]:.3f}] "
                f"pass {s['pass_rate']:.3f} [{s['pass_rate_ci95'][0]:.3f}, {s['pass_rate_ci95'][1]:.3f}] "
                f"over {s['n']} samples ({s['problems']} problems x {samples})")
    finally:
        if local is not None:
            local.__exit__(None, None, None)
    summary = {"source": source, "problems_file": os.path.abspath(problems_path), "samples": samples,
               "max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p, "seed": seed,
               "seconds": round(time.time() - t0, 2),
               "modes": {m: summarize([r for r in rows_out if r["mode"] == m]) for m in modes}}
    os.makedirs(out, exist_ok=True)
    write_text(os.path.join(out, "samples.jsonl"), "".join(json.dumps(r) + "\n" for r in rows_out))
    write_text(os.path.join(out, "summary.json"), json.dumps(summary, indent=1) + "\n")
    return summary



def read_summaries(run_dir: str) -> dict:
    """{eval name: summary} of the evaluations stored under RUN/eval/ (for the report)."""
    out = {}
    base = os.path.join(run_dir, "eval")
    if not os.path.isdir(base):
        return out
    for name in sorted(os.listdir(base)):
        p = os.path.join(base, name, "summary.json")
        try:
            with open(p, encoding="utf-8") as f:
                out[name] = json.load(f)
        except (OSError, ValueError):
            continue
    return out


def cli(argv) -> int:
    ap = argparse.ArgumentParser(prog="pgrpo eval", description="Sample, grade and summarise, per loophole mode.")
    ap.add_argument("target", help="a run directory, or a model: tiny, an HF id, a local HF dir (pgrpo export)")
    ap.add_argument("--problems", required=True, help="problems .jsonl (the rl-rewardhacking schema)")
    ap.add_argument("--mode", default=DEFAULT_MODES,
                    help=f"comma-separated loophole modes, each a separate evaluation (default {DEFAULT_MODES}: "
                         f"no hint, then the overwrite-tests hint, as the benchmark evaluates)")
    ap.add_argument("--samples", type=int, default=1, help="completions per problem and mode (default 1)")
    ap.add_argument("--out", default=None, help="output dir (default RUN/eval/<problems stem>, else eval/<stem>)")
    ap.add_argument("--step", type=int, default=None, help="a run's checkpoint step (default the newest)")
    ap.add_argument("--max-new-tokens", type=int, default=512)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-problems", type=int, default=0, help="only the first K problems (0 = all)")
    ap.add_argument("--batch", type=int, default=4, help="problems per generate() call")
    ap.add_argument("--socket", default=None, help="a running grader (default: start one)")
    ap.add_argument("--workers", type=int, default=max(1, min(8, os.cpu_count() or 1)))
    ap.add_argument("--time-limit", type=float, default=5.0, help="grader seconds per problem run (default 5)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    a = ap.parse_args(argv)
    from types import SimpleNamespace

    from pgrpo.model import resolve_device_dtype
    device, dtype = resolve_device_dtype(SimpleNamespace(device=a.device, dtype=a.dtype))
    modes = [m.strip() for m in a.mode.split(",") if m.strip()]
    stem = os.path.splitext(os.path.basename(a.problems))[0]
    out = a.out or (os.path.join(a.target, "eval", stem) if os.path.isdir(a.target) else os.path.join("eval", stem))
    if a.max_problems < 0 or a.batch < 1 or a.time_limit <= 0:
        raise UserError("--max-problems must be >= 0, --batch >= 1 and --time-limit > 0.")
    evaluate(a.target, a.problems, modes, a.samples, out, max_new_tokens=a.max_new_tokens,
             temperature=a.temperature, top_p=a.top_p, seed=a.seed, step=a.step, max_problems=a.max_problems,
             socket=a.socket, workers=a.workers, time_limit=a.time_limit, device=device, dtype=dtype, batch=a.batch,
             log=lambda m: print(m, flush=True))
    print(f"eval: wrote {os.path.join(out, 'samples.jsonl')} and {os.path.join(out, 'summary.json')}", file=sys.stderr)
    return 0
