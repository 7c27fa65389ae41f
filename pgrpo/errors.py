"""One exception type for mistakes a person can fix (bad config, missing file, malformed row).

The CLI prints its message as one sentence and exits non-zero; everything else is a bug and keeps
its traceback.
"""


class UserError(Exception):
    """A problem with the user's input, reported as one clear sentence."""
