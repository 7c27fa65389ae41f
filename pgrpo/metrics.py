"""Per-step observability: metrics.jsonl rows, a live line for people, and Prometheus metrics.

Prometheus (names fixed in the team contract, `pgrpo_` prefix, unit suffixes): its own CollectorRegistry
(never the global one, so two trainers in one process or a test cannot collide), labels `run`, `arm`, `seed`
only (+ `phase` / `outcome`), bounded cardinality (never the step number). Histogram buckets span 10 ms to
30 min: tiny CPU steps take ~0.1-10 s, a Qwen3-4B step with 258 rollouts takes minutes.
"""
from __future__ import annotations

import json
import os
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

PHASES = ("gen", "fwd_bwd", "reward", "project", "optim", "total")
BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600, 1200, 1800)
GRADER_OUTCOMES = ("ok", "error", "retry", "timeout")

# row key -> gauge name
GAUGES = {
    "reward_mean": "pgrpo_reward_mean",
    "hack_rate": "pgrpo_hack_ratio",
    "pass_rate": "pgrpo_pass_ratio",
    "proj_removed_frac": "pgrpo_projection_removed_ratio",
    "proj_fired_frac": "pgrpo_projection_fired_ratio",
    "grad_vhack_cos": "pgrpo_grad_vhack_cosine",
    "update_along_vhack": "pgrpo_update_along_vhack",
    "delta_hack_norm": "pgrpo_delta_s_hack_norm",
    "vhack_overlap": "pgrpo_vhack_overlap",   # set at a v_hack refresh only (basis overlap with the previous one)
    "probe_hack_prob": "pgrpo_probe_hack_probability",          # teacher-forced, held-out prompts (pgrpo/probe.py)
    "rollout_cos_hack": "pgrpo_rollout_grad_vhack_cosine_hack",  # per-rollout cos(g_i, v_hack), reward_hack ones
    "rollout_cos_other": "pgrpo_rollout_grad_vhack_cosine_other",  # ... and the others
}


class Metrics:
    """Prometheus face of a run. port 0 = nothing is served (the objects still count, which is harmless)."""

    def __init__(self, run: str, arm: str, seed: int, port: int = 0, addr: str = "0.0.0.0"):
        self.registry = CollectorRegistry()
        self.labels = {"run": run, "arm": arm, "seed": str(seed)}
        names = ["run", "arm", "seed"]
        r = self.registry
        self.phase = Histogram("pgrpo_step_phase_seconds", "Wall time of each phase of a training step.",
                               names + ["phase"], buckets=BUCKETS, registry=r)
        self.steps = Counter("pgrpo_steps_total", "Optimizer steps completed.", names, registry=r)
        self.tokens = Counter("pgrpo_tokens_generated_total", "Completion tokens generated.", names, registry=r)
        self.skipped = Counter("pgrpo_skipped_groups_total", "Groups skipped for zero reward variance.", names, registry=r)
        self.grader = Counter("pgrpo_grader_requests_total", "Grader requests by outcome.", names + ["outcome"], registry=r)
        self.gauges = {k: Gauge(n, f"Last step's {k}.", names, registry=r) for k, n in GAUGES.items()}
        self.ckpt = Gauge("pgrpo_last_checkpoint_timestamp_seconds", "Unix time of the last checkpoint written.",
                          names, registry=r)
        for p in PHASES:  # expose every series from the start, so dashboards and scrapes see zeros, not gaps
            self.phase.labels(**self.labels, phase=p)
        for o in GRADER_OUTCOMES:
            self.grader.labels(**self.labels, outcome=o)
        for m in (self.steps, self.tokens, self.skipped, self.ckpt, *self.gauges.values()):
            m.labels(**self.labels)
        self.server = self.thread = None
        if port:
            try:
                self.server, self.thread = start_http_server(port, addr=addr, registry=r)
            except OSError as e:
                from pgrpo.errors import UserError
                raise UserError(f"cannot serve metrics on port {port} ({e.strerror}); pick another --metrics-port.") from None

    def grader_request(self, outcome: str, n: int = 1) -> None:
        self.grader.labels(**self.labels, outcome=outcome).inc(n)   # n > 1: another rank's outcomes (torchrun)

    def checkpoint_saved(self, ts: float | None = None) -> None:
        self.ckpt.labels(**self.labels).set(time.time() if ts is None else ts)

    def observe_step(self, row: dict) -> None:
        for p in PHASES:
            if p in row.get("timing", {}):
                self.phase.labels(**self.labels, phase=p).observe(row["timing"][p])
        self.steps.labels(**self.labels).inc()
        self.tokens.labels(**self.labels).inc(row.get("tokens_generated", 0))
        self.skipped.labels(**self.labels).inc(row.get("skipped_groups", 0))
        for k, g in self.gauges.items():
            if row.get(k) is not None:
                g.labels(**self.labels).set(row[k])

    def close(self, linger_s: float = 0.0) -> None:
        """Stop serving; with linger_s keep /metrics up that long first (lets a scraper read the final values)."""
        if self.server is None:
            return
        if linger_s > 0:
            try:
                time.sleep(linger_s)
            except KeyboardInterrupt:  # SIGTERM/Ctrl-C ends the linger early, not the clean shutdown
                pass
        self.server.shutdown()
        self.server.server_close()
        self.server = None


# ----------------------------------------------------------------------------- jsonl + people

class JsonlLog:
    """metrics.jsonl: one JSON row per step, flushed at once (a killed run keeps every finished step)."""

    def __init__(self, path: str, rows: list[dict] | None = None):
        self.path = path
        if rows is not None:  # resume: the checkpoint's rows are the truth; drop rows of steps it never saw
            tmp = f"{path}.tmp.{os.getpid()}"
            with open(tmp, "w") as f:
                for row in rows:
                    f.write(json.dumps(row) + "\n")
            os.replace(tmp, path)
        self.f = open(path, "a")

    def write(self, row: dict) -> None:
        self.f.write(json.dumps(row) + "\n")
        self.f.flush()

    def close(self) -> None:
        self.f.close()


def timing_line(row: dict) -> str:
    t = row["timing"]
    return "TIMING step={} ".format(row["step"]) + " ".join(f"{p}={t[p]:.2f}s" for p in PHASES)


def progress_line(row: dict, steps: int) -> str:
    """A compact live line for people: what changed this step, at a glance."""
    # the policy's own reward first; teacher completions (mixed in for reward variance) are reported apart
    teacher = row.get("reward_mean_teacher")
    reward = f"reward {row['reward_mean']:.2f}" + ("" if teacher is None else f" (teacher {teacher:.2f})")
    parts = [f"step {row['step']}/{steps}", reward, f"hack {row['hack_rate']:.2f}", f"pass {row['pass_rate']:.2f}"]
    if "frac_correct_attempted_hack" in row:   # hacked tests after a correct solution: not reward_hack, still the exploit
        parts.append(f"hacked-tests {row['hack_rate'] + row['frac_correct_attempted_hack']:.2f}")
    if "probe_hack_prob" in row:
        parts.append(f"P(hack) held-out {row['probe_hack_prob']:.2f}")
    parts += [f"tok {row['tokens_generated']}",
             f"skip {row['skipped_groups']}/{row['groups']}", f"loss {row['loss']:+.4f}",
             f"|g| {row.get('grad_norm', 0.0):.3g}"]
    if "proj_removed_frac" in row:
        parts.append(f"removed {row['proj_removed_frac']:.2f}")
    if "update_along_vhack" in row:
        parts.append(f"upd.v {row['update_along_vhack']:.3f} (hack-ward {row.get('update_hackward', 0.0):.3f})")
    parts.append(f"{row['timing']['total']:.1f}s")
    return " | ".join(parts)
