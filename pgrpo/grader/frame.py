"""The grader's one wire frame, host side: a 4-byte big-endian length, then that many bytes of UTF-8 JSON.

Used on the service socket (server <-> client) and on the zygote's pipes (sandbox <-> harness). Two files
keep their own few-line copy because they must run without this package: the in-sandbox harness (started
as `python -I -S -c <source>`, it imports nothing of ours) and deploy/healthcheck.py (a probe that must
report a broken package as "unhealthy" rather than crash importing it).

Reading is deadline-bound at every step: a peer that sends part of a frame (even 1-3 bytes of the length)
and stalls is cut off after `stall_s`, and a whole frame must arrive within `stall_s + n / MIN_RATE`
seconds, so a slow drip cannot hold a reader either.
"""
import json
import os
import select
import socket
import struct
import time

HEADER = struct.Struct(">I")
MIN_RATE = 1 << 20   # bytes/s a peer must sustain once a frame has started


class FrameError(Exception):
    """A frame could not be read. `fatal`: the stream is out of step and must be closed (a truncated or
    oversized frame); not fatal: the frame arrived whole but is not UTF-8 JSON (the next one may be fine)."""

    def __init__(self, msg, fatal=True):
        super().__init__(msg)
        self.fatal = fatal


def encode(obj):
    body = json.dumps(obj).encode("utf-8")
    return HEADER.pack(len(body)) + body


def decode(body):
    try:
        return json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise FrameError(f"malformed frame: not UTF-8 JSON ({type(e).__name__})", fatal=False) from None


def send(sock, obj):
    sock.sendall(encode(obj))


def _recv_until(sock, n, deadline, stall_s, what, buf=b""):
    buf = bytearray(buf)
    while len(buf) < n:
        left = deadline - time.monotonic()
        if left <= 0:
            raise FrameError(f"truncated {what}: stalled after {len(buf)} of {n} bytes")
        sock.settimeout(min(stall_s, left))
        try:
            chunk = sock.recv(min(n - len(buf), 1 << 20))
        except socket.timeout:
            raise FrameError(f"truncated {what}: stalled after {len(buf)} of {n} bytes") from None
        if not chunk:
            raise FrameError(f"truncated {what}: got {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


def recv(sock, max_bytes, idle_s=None, stall_s=30.0, what="frame", idle_raises=False):
    """One frame from a stream socket -> the decoded object, or None on a clean end of stream (or after
    `idle_s` without a single byte, unless `idle_raises`: then socket.timeout). Raises FrameError (see its
    `fatal`) for a partial, oversized or malformed frame."""
    sock.settimeout(idle_s)
    try:
        first = sock.recv(1)
    except socket.timeout:
        if idle_raises:
            raise
        return None
    if not first:
        return None
    # from the first byte on, the rest of the length prefix is a partial frame like any other
    head = _recv_until(sock, 4, time.monotonic() + stall_s, stall_s, what + " length prefix", first)
    (n,) = HEADER.unpack(head)
    if n > max_bytes:
        raise FrameError(f"{what} too large: {n} bytes > limit {max_bytes}")
    body = _recv_until(sock, n, time.monotonic() + stall_s + n / MIN_RATE, stall_s, what)
    return decode(body)


def write_fd(f, obj):
    """Write one frame to a binary file object (a pipe) and flush."""
    f.write(encode(obj))
    f.flush()


def _read_fd_exact(fd, n, deadline):
    buf = bytearray()
    while len(buf) < n:
        left = deadline - time.monotonic()
        if left <= 0:
            raise FrameError("no answer in time")
        r, _, _ = select.select([fd], [], [], left)
        if not r:
            continue
        chunk = os.read(fd, min(n - len(buf), 1 << 20))
        if not chunk:
            raise FrameError("the other end exited")
        buf += chunk
    return bytes(buf)


def read_fd(fd, max_bytes, deadline):
    """One frame from a pipe fd by `deadline` (time.monotonic()) -> the decoded object; FrameError else."""
    (n,) = HEADER.unpack(_read_fd_exact(fd, 4, deadline))
    if n > max_bytes:
        raise FrameError(f"frame too large: {n} bytes > limit {max_bytes}")
    return decode(_read_fd_exact(fd, n, deadline))
