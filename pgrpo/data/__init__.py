"""Problems (rl-rewardhacking jsonl schema) and the prompts built from them. Torch-free by design:
the grader container imports this package and has no torch."""

from pgrpo.data.problems import (Problem, builtin_problems, compose_question, load_problems,
                                 problem_from_row, problem_to_row)
from pgrpo.data.prompts import (LOOPHOLE_MODES, RESULT_FILE, RESULT_FILE_PASS, RUN_TESTS_FUNC,
                                SENTINEL_ATTR, SENTINEL_CLASS, STDOUT_MARKER, SYSTEM_PROMPT,
                                build_prompt, loophole_hint)
