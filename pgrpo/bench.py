"""`pgrpo bench kernel|grader|step`: each benchmark lives beside what it measures."""
from __future__ import annotations

import importlib

from pgrpo.errors import UserError

BENCHES = {
    "kernel": "pgrpo.bench_kernel:main",   # fused ops vs per-module torch loop vs batched torch
    "grader": "pgrpo.grader.bench:main",   # grader service vs a fresh `python -c` per check
    "step": "pgrpo.bench_step:main",       # merged vs factored generation, cache on/off, phase breakdown
}


HELP = """usage: pgrpo bench kernel|grader|step [ARGS]

  kernel   the fused basis-change + projection ops vs a per-module torch loop vs batched torch
  grader   the grader service vs a fresh `python -c` per check
  step     one training step's phases: merged vs factored generation, KV cache on/off

`pgrpo bench NAME --help` lists that benchmark's own options."""


def cli(argv: list[str]) -> int:
    if argv and argv[0] in ("-h", "--help", "help"):
        print(HELP)
        return 0
    if not argv or argv[0] not in BENCHES:
        raise UserError(f"say which benchmark to run: one of {', '.join(BENCHES)} (e.g. `pgrpo bench kernel`).")
    mod, fn = BENCHES[argv[0]].split(":")
    return int(getattr(importlib.import_module(mod), fn)(argv[1:]) or 0)
