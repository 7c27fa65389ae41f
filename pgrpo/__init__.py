"""projected-grpo: GRPO with gradient projection away from a reward-hack direction.

Import-light on purpose: ``pgrpo.grader`` and ``pgrpo.data`` must import without torch
(the grader container has neither torch nor transformers).
"""

__version__ = "0.1.0"
