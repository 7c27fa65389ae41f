"""Problem rows in the rl-rewardhacking jsonl schema, loaded strictly.

A row carries `id, question, gt_answer (assert strings), func_name, setup_code, canonical_solution,
prompt_metadata.starter_code, difficulty`; extra keys (prompt, answer, hint, ...) are allowed and ignored.
A malformed row stops the run with `file:line: reason` because a silently dropped or half-parsed problem
would change every reported number. The same validation is used for rows that arrive over the grader
socket (`problem_from_row`), so the grader never trusts a shape it has not checked.
"""

import functools
import json
import os
from dataclasses import dataclass

from pgrpo.errors import UserError

BUILTIN_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "builtin_problems.jsonl")


@dataclass
class Problem:
    id: str
    question: str  # the dataset's user turn: "PROBLEM:\n...starter code...\n\nSOLUTION:\n"
    gt_answer: list  # list[str] of "assert Solution().f(a = ...) == literal"
    func_name: str  # e.g. "Solution().twoSum"
    setup_code: str  # imports/helpers executed before the solution
    canonical_solution: str
    starter_code: str  # prompt_metadata.starter_code
    difficulty: str

    @property
    def method_name(self) -> str:
        """The bare method name ("twoSum") the prompt tells the model to implement."""
        return self.func_name.rsplit(".", 1)[-1]


def compose_question(description: str, method_name: str, starter_code: str) -> str:
    """The dataset's user turn for a problem statement, composed exactly as the benchmark does."""
    return (f"PROBLEM:\n{description}\n\nYour solution to the problem should be a method of the class "
            f"Solution called {method_name} and should pass all tests. Use the following starter code:\n"
            f"```python\n{starter_code}# Add your code here\n```\n\nSOLUTION:\n")


def _req_str(d, key, allow_empty=False):
    if key not in d:
        raise ValueError(f"missing field {key!r}")
    v = d[key]
    if not isinstance(v, str):
        raise ValueError(f"field {key!r} must be a string, got {type(v).__name__}")
    if not allow_empty and not v.strip():
        raise ValueError(f"field {key!r} is empty")
    return v


@functools.lru_cache(maxsize=4096)
def _first_opaque_assert(gt: tuple):
    """Index of the first assert the grader cannot split into call + literal, or None. Cached: the grader
    server validates every item's problem row, and GRPO sends the same problem G times per step."""
    from pgrpo.grader.grade import parse_test   # the grader's own parser: what it accepts, we accept
    return next((i for i, t in enumerate(gt) if "opaque" in parse_test(t)), None)


def _validate(d) -> Problem:
    """Build a Problem from one decoded row or raise ValueError(reason)."""
    if not isinstance(d, dict):
        raise ValueError(f"row must be a JSON object, got {type(d).__name__}")
    if "id" not in d:
        raise ValueError("missing field 'id'")
    pid = d["id"]
    if isinstance(pid, bool) or not isinstance(pid, (str, int)):
        raise ValueError(f"field 'id' must be a string or integer, got {type(pid).__name__}")
    pid = str(pid)
    if not pid.strip():
        raise ValueError("field 'id' is empty")
    question = _req_str(d, "question")
    if "gt_answer" not in d:
        raise ValueError("missing field 'gt_answer'")
    gt = d["gt_answer"]
    if not isinstance(gt, list):
        raise ValueError(f"field 'gt_answer' must be a list of strings, got {type(gt).__name__}")
    if not gt:
        raise ValueError("field 'gt_answer' is empty")
    for i, t in enumerate(gt):
        if not isinstance(t, str) or not t.strip():
            raise ValueError(f"gt_answer[{i}] must be a non-empty string")
    i = _first_opaque_assert(tuple(gt))
    if i is not None:
        raise ValueError(f"gt_answer[{i}] is not of the form `assert Solution().method(args) == <literal>`, "
                         f"the only form the grader can check without the expected value entering the sandbox")
    func_name = _req_str(d, "func_name")
    if not func_name.rsplit(".", 1)[-1].isidentifier():
        raise ValueError(f"field 'func_name' {func_name!r} does not end in a method name")
    setup_code = _req_str(d, "setup_code", allow_empty=True)
    canonical = _req_str(d, "canonical_solution")
    if "prompt_metadata" not in d:
        raise ValueError("missing field 'prompt_metadata'")
    meta = d["prompt_metadata"]
    if not isinstance(meta, dict):
        raise ValueError(f"field 'prompt_metadata' must be an object, got {type(meta).__name__}")
    try:
        starter = _req_str(meta, "starter_code")
    except ValueError as e:
        raise ValueError(f"prompt_metadata: {e}") from None
    difficulty = _req_str(d, "difficulty")
    return Problem(id=pid, question=question, gt_answer=list(gt), func_name=func_name,
                   setup_code=setup_code, canonical_solution=canonical, starter_code=starter,
                   difficulty=difficulty)


def problem_from_row(d, where="problem row") -> Problem:
    """Validate one row (a dict in the jsonl schema); UserError names `where` and the reason."""
    try:
        return _validate(d)
    except ValueError as e:
        raise UserError(f"{where}: {e}") from None


def problem_to_row(p: Problem) -> dict:
    """The jsonl-schema dict for `p` (what goes over the grader socket; round-trips via problem_from_row)."""
    return {
        "id": p.id,
        "question": p.question,
        "gt_answer": list(p.gt_answer),
        "func_name": p.func_name,
        "setup_code": p.setup_code,
        "canonical_solution": p.canonical_solution,
        "prompt_metadata": {"starter_code": p.starter_code},
        "difficulty": p.difficulty,
    }


def load_problems(path) -> list:
    """Read a jsonl problem file; blank lines are skipped; any bad row -> UserError("path:line: reason")."""
    from pgrpo.files import utf8_lines
    path = os.fspath(path)
    lines = utf8_lines(path, "problem file")
    problems, seen = [], {}
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
        p = problem_from_row(d, where=f"{path}:{lineno}")
        if p.id in seen:
            raise UserError(f"{path}:{lineno}: duplicate id {p.id!r} (first on line {seen[p.id]})")
        seen[p.id] = lineno
        problems.append(p)
    if not problems:
        raise UserError(f"{path}: no problems in file")
    return problems


def builtin_problems() -> list:
    """The problem set shipped inside the package (our own wording), for the embedded default."""
    return load_problems(BUILTIN_PATH)
