"""`pgrpo` command line: a thin dispatcher. Each subcommand lives next to the code it drives and is
imported lazily, so `pgrpo grader serve` and `pgrpo grade` run without torch installed.

Each entry names ``module:function``; the function takes the remaining argv and returns an exit code.
"""
from __future__ import annotations

import importlib
import signal
import sys
import threading

from pgrpo.errors import Terminated, UserError

COMMANDS = {
    # name: (module:function, one-line help)
    "train": ("pgrpo.train:cli", "run a GRPO job: pgrpo train --config jobs/X.yaml [--set k=v] [--out runs/NAME] [--resume RUN_DIR]"),
    "grader": ("pgrpo.grader.server:cli", "grader service: pgrpo grader serve --socket PATH [--workers N]"),
    "grade": ("pgrpo.grader.cli:cli_grade", "grade responses: pgrpo grade --problems P.jsonl --responses R.jsonl"),
    "bench": ("pgrpo.bench:cli", "benchmarks: pgrpo bench kernel|grader|step"),
    "pairs": ("pgrpo.data.pairs:cli", "contrastive pairs: pgrpo pairs --check FILE | --build OUT"),
    "extract": ("pgrpo.vhack:cli", "extract v_hack: pgrpo extract --config jobs/X.yaml --out vhack.safetensors"),
    "sweep": ("pgrpo.sweep:cli", "run or inspect a sweep: pgrpo sweep --config jobs/sweep-full.yaml [status]"),
    "report": ("pgrpo.report:cli", "H1 report: pgrpo report RUNS... [--out report/]"),
    "rollouts": ("pgrpo.rollouts:cli", "saved completions: pgrpo rollouts RUN [--step N] [--label reward_hack]"),
    "export": ("pgrpo.export:cli", "HF model dir: pgrpo export RUN [--step N] --out DIR [--quarantine off|on]"),
    "eval": ("pgrpo.evaluate:cli", "benchmark eval: pgrpo eval RUN|MODEL --problems P.jsonl [--mode none,run_tests] [--samples N]"),
}


def _on_sigterm(signum, frame):
    raise Terminated()


def usage() -> str:
    lines = ["usage: pgrpo COMMAND [ARGS]", "", "commands:"]
    lines += [f"  {name:<8} {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"pgrpo: unknown command {name!r}; run `pgrpo --help` for the list.", file=sys.stderr)
        return 2
    target = COMMANDS[name][0]
    mod_name, fn_name = target.split(":")
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _on_sigterm)   # unwind cleanly (children stopped, temp files removed)
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        # a shell starts background jobs with SIGINT ignored, and Python then never raises KeyboardInterrupt: an
        # explicit `kill -INT` must still stop the job cleanly (exit 130, grader stopped, temp files removed)
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        fn = getattr(importlib.import_module(mod_name), fn_name)
        return int(fn(rest) or 0)
    except UserError as e:
        print(f"pgrpo {name}: {e}", file=sys.stderr)
        return 2
    except Terminated:
        print(f"pgrpo {name}: terminated (SIGTERM).", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print(f"pgrpo {name}: interrupted.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
