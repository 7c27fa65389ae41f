#!/usr/bin/env python3
"""Container health probes. Standard library only: the grader image has nothing else installed.

    pgrpo-healthcheck grader [SOCKET]   # {"op": "health"} over the grader's Unix socket; exit 0 iff {"ok": true}
    pgrpo-healthcheck metrics [URL]     # GET the trainer's Prometheus endpoint; exit 0 iff it serves pgrpo_ metrics

The grader probe speaks the wire protocol itself (4-byte big-endian length + UTF-8 JSON) instead of importing
pgrpo, so a broken package import shows up as an unhealthy container rather than a crashing probe.
Defaults come from the environment: PGRPO_GRADER_SOCKET (/sock/grader.sock), PGRPO_METRICS_PORT (9400).
"""
import json
import os
import socket
import struct
import sys
import urllib.request


def grader_health(path: str, timeout: float = 5.0) -> dict:
    # Its own copy of the frame (pgrpo/grader/frame.py is the host side's): a probe must not import pgrpo.
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(path)
        body = json.dumps({"op": "health"}).encode()
        s.sendall(struct.pack(">I", len(body)) + body)
        f = s.makefile("rb")
        head = f.read(4)
        if len(head) != 4:
            raise ConnectionError("grader closed the connection without a reply")
        (n,) = struct.unpack(">I", head)
        reply = json.loads(f.read(n).decode())
    if not reply.get("ok"):
        raise RuntimeError(f"grader is not healthy: {reply}")
    return reply


def metrics_health(url: str, timeout: float = 5.0) -> int:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        text = r.read().decode("utf-8", "replace")
    n = sum(1 for line in text.splitlines() if line.startswith("pgrpo_"))
    if n == 0:
        raise RuntimeError(f"{url} serves no pgrpo_ metrics")
    return n


def main(argv: list[str]) -> int:
    what = argv[0] if argv else ""
    try:
        if what == "grader":
            path = argv[1] if len(argv) > 1 else os.environ.get("PGRPO_GRADER_SOCKET", "/sock/grader.sock")
            print(f"grader ok: {grader_health(path)}")
        elif what == "metrics":
            port = os.environ.get("PGRPO_METRICS_PORT", "9400")
            url = argv[1] if len(argv) > 1 else f"http://127.0.0.1:{port}/metrics"
            print(f"metrics ok: {metrics_health(url)} pgrpo_ samples at {url}")
        else:
            print(__doc__.strip(), file=sys.stderr)
            return 2
    except Exception as e:  # any failure is "unhealthy", reported in one line for `docker inspect`
        print(f"unhealthy: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
