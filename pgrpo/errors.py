"""One exception type for mistakes a person can fix (bad config, missing file, malformed row).

The CLI prints its message as one sentence and exits non-zero; everything else is a bug and keeps
its traceback.
"""


class UserError(Exception):
    """A problem with the user's input, reported as one clear sentence."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, turned into an exception so `finally` blocks run (grader child stopped, files closed); the CLI
    exits 143 (128 + SIGTERM), as a process killed by the signal would."""
