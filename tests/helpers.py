"""Small things several test files need (pytest puts this directory on sys.path: `from helpers import ...`)."""
import os
import socket
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A loopback TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _shared_path() -> Path:
    p = Path(os.environ.get("PGRPO_SHARED_DATA", REPO.parent / "shared" / "data"))
    return p / "leetcode_medhard_dev.jsonl" if p.is_dir() else p


# the 80 real benchmark rows beside the repo (../shared/data), or PGRPO_SHARED_DATA (a file or its folder)
SHARED = _shared_path()

# the skip reason of a test that needs them: where they were looked for, and how to point elsewhere
SHARED_MISSING = (f"the shared benchmark rows are not at {SHARED}; put leetcode_medhard_dev.jsonl in ../shared/data "
                  f"beside the repo or set PGRPO_SHARED_DATA=/path/to/the.jsonl (or its folder)")
