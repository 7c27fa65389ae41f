"""What the sandbox claims, read on the trusted side: in time linear in a capped number of bytes, never
building a hash table (set, dict) out of untrusted data, never displaced by lines a response forges.

The sandbox's result channel is a stream of JSON lines the job child writes (harness.child_main); model code
shares that process and can write any bytes to the same channel, so every line is a claim:
- status lines start with their key: {"compile": true}, {"exec": false, "e": ...}, {"loophole": true}, ...
  `Report.first(key)` returns the first well-formed one. (The compile line is written before any model code
  runs, so its first one is always the harness's own.)
- test claims: {"i": <test index>, "v": <tagged plain data>} or {"i": <index>, "e": <error>}. For each test
  the LAST well-formed claim counts, exactly one: the harness writes test i's claim right after its call
  returns, so lines forged at import time (or during an earlier call) come before it and cannot displace it;
  lines forged later can only replace it with another single guess, which passes only if it IS the right
  value. Spraying many guesses for a test gains nothing: one claim per test is read.
Cost: the claims are searched from the end of the text (a flood at import time is never read), each candidate
line no longer than the honest encoding of its expected value could be (longer: it cannot be equal, skip
without parsing), at most `4 * tests + 4096` candidates and `deadline_s` seconds; a claim with more nodes than
its expected value is refused before it is sorted. Comparison is structural against the trusted expected
value (`key`): both sides become canonical nested tuples in which a set or dict is a sorted tuple of its
elements, so Python `==` on plain data is decided by comparisons alone (1 == 1.0 == True, tuple != list,
set == frozenset, nan equals nothing) and hash-colliding forged elements cost nothing extra. Whatever does not
fit these bounds is simply not a pass: the response is graded on what could be read.
"""
import json
import math
import re
import time

MAX_STATUS_LINE = 4096    # bytes of one status line
MAX_STATUS_CANDIDATES = 1024
DEADLINE_S = 2.0          # trusted seconds per reply, a backstop far above what the caps allow
_CLAIM_HEAD = re.compile(r'\{"i": (\d{1,9}), "([ve])": ')


class Mismatch(Exception):
    """The claim is not plain data of the expected size and shape (so it cannot equal the expected value)."""


# ----------------------------------------------------------------------------- canonical keys

def _num(x):
    if type(x) is float:
        if x != x:
            return None
        if math.isfinite(x) and x.is_integer():
            return (0, int(x))   # 2.0 and 2 are the same key, as 2.0 == 2
    return (0, int(x) if type(x) is bool else x)


def key(x):
    """The canonical key of a trusted expected value (see the module docstring)."""
    t = type(x)
    if t is bool or t is int or t is float:
        k = _num(x)
        return (0, x) if k is None else k   # nan stays a float key: no claim key can equal it
    if t is str:
        return (1, x)
    if x is None:
        return (2,)
    if t is list:
        return (3, tuple(key(e) for e in x))
    if t is tuple:
        return (4, tuple(key(e) for e in x))
    if t is set or t is frozenset:
        return (5, tuple(sorted(key(e) for e in x)))
    if t is dict:
        return (6, tuple(sorted((key(k), key(v)) for k, v in x.items())))
    raise TypeError(f"not a plain expected value: {t.__name__}")


def size(x):
    """(nodes, JSON bytes): the node count of `x` and an upper bound on the length of the harness's encoding
    of any value equal to it (numbers as floats, every character \\u-escaped, tags and separators)."""
    t = type(x)
    if x is None or t is bool:
        return 1, 8
    if t is int:
        return 1, max(x.bit_length() * 30103 // 100000 + 2, 24) + 4   # decimal digits, without str() on it
    if t is float:
        return 1, 28
    if t is str:
        return 1, 12 * len(x) + 4
    if t is dict:
        items = [size(k) for k in x] + [size(v) for v in x.values()]
        return 1 + sum(n for n, _ in items), 12 + sum(b + 4 for _, b in items)
    items = [size(e) for e in x]
    return 1 + sum(n for n, _ in items), 12 + sum(b + 2 for _, b in items)


def depth(x):
    t = type(x)
    if t is dict:
        return 1 + max((max(depth(k), depth(v)) for k, v in x.items()), default=0)
    if t in (list, tuple, set, frozenset):
        return 1 + max((depth(e) for e in x), default=0)
    return 0


def claim_key(c, max_nodes, max_depth):
    """The canonical key of a decoded claim (tagged plain data: list, {"t"|"s"|"f": [..]}, {"d": [[k, v], ..]},
    numbers, str, None). Raises Mismatch on anything else, on more than `max_nodes` nodes or `max_depth` levels,
    on nan, and on a duplicate set element or dict key (an honest encoding of a set or dict has none)."""
    left = [max_nodes]

    def walk(c, d):
        left[0] -= 1
        if left[0] < 0 or d > max_depth:
            raise Mismatch("claim larger than the expected value")
        t = type(c)
        if t is bool or t is int or t is float:
            k = _num(c)
            if k is None:
                raise Mismatch("nan")
            return k
        if t is str:
            return (1, c)
        if c is None:
            return (2,)
        if t is list:
            return (3, tuple(walk(e, d + 1) for e in c))
        if t is dict and len(c) == 1:
            (tag, v), = c.items()
            if type(v) is list:
                if tag == "t":
                    return (4, tuple(walk(e, d + 1) for e in v))
                if tag == "s" or tag == "f":
                    return (5, _unique(sorted(walk(e, d + 1) for e in v), lambda k: k))
                if tag == "d":
                    pairs = []
                    for kv in v:
                        if type(kv) is not list or len(kv) != 2:
                            raise Mismatch("bad dict item")
                        pairs.append((walk(kv[0], d + 1), walk(kv[1], d + 1)))
                    return (6, _unique(sorted(pairs), lambda p: p[0]))
        raise Mismatch("not tagged plain data")

    try:
        return walk(c, 0)
    except RecursionError:
        raise Mismatch("too deep") from None


def _unique(items, field):
    for a, b in zip(items, items[1:]):
        if field(a) == field(b):
            raise Mismatch("duplicate element")
    return tuple(items)


def matches(expected, claim_value):
    """Does the claimed (decoded JSON) value equal the trusted expected value under Python `==` on plain data?"""
    n, _ = size(expected)
    try:
        return claim_key(claim_value, n, depth(expected) + 1) == key(expected)
    except Mismatch:
        return False


# ----------------------------------------------------------------------------- the result text

class Report:
    """The result lines of one sandbox reply."""

    def __init__(self, text, deadline_s=DEADLINE_S):
        self.t = "\n" + (text if type(text) is str else "")
        self.deadline = time.monotonic() + deadline_s

    def _line(self, start, max_len):
        """The line starting at self.t[start] (just after a newline) if at most max_len long, else None."""
        end = self.t.find("\n", start, start + max_len + 1)
        if end < 0:
            if len(self.t) - start > max_len:
                return None
            end = len(self.t)
        return self.t[start:end]

    def first(self, key_name, before=None):
        """The first well-formed status line whose first key is `key_name` -> dict, or None. With `before`, only
        a line ahead of the first `before` status line counts (the harness writes that one before model code
        runs, so what precedes it is the harness's own)."""
        needle = '\n{"%s": ' % key_name
        limit = len(self.t)
        if before is not None:
            b = self.t.find('\n{"%s": ' % before)
            limit = len(self.t) if b < 0 else b
        pos = 0
        for _ in range(MAX_STATUS_CANDIDATES):
            p = self.t.find(needle, pos, limit)
            if p < 0 or time.monotonic() > self.deadline:
                return None
            pos = p + 1
            line = self._line(p + 1, MAX_STATUS_LINE)
            if line is None:
                continue
            try:
                d = json.loads(line)
            except (ValueError, RecursionError):
                continue
            if type(d) is dict and key_name in d:
                return d
        return None

    def passed(self, expected):
        """-> list of bools, one per expected value: did the last well-formed claim for that test equal it?"""
        n = len(expected)
        verdict = [None] * n
        budgets = [64 + size(x)[1] for x in expected]
        end, undecided = len(self.t), n
        for count in range(4 * n + 4096):
            if undecided == 0:
                break
            if count % 64 == 63 and time.monotonic() > self.deadline:
                break
            p = self.t.rfind('\n{"i": ', 0, end)
            if p < 0:
                break
            end = p
            m = _CLAIM_HEAD.match(self.t, p + 1)
            if m is None:
                continue
            i = int(m.group(1))
            if i >= n or verdict[i] is not None:
                continue
            # an error claim ({"i": i, "e": <type name>}) is a few dozen bytes whatever the expected value
            line = self._line(p + 1, max(budgets[i], MAX_STATUS_LINE) if m.group(2) == "e" else budgets[i])
            if line is None:
                continue   # longer than any encoding of the right value: not a pass, and an earlier claim may be
            try:
                d = json.loads(line)
            except (ValueError, RecursionError):
                continue   # a cut-off or garbage line is no claim
            if type(d) is not dict or d.get("i") != i or type(d.get("i")) is not int or not ("v" in d or "e" in d):
                continue
            verdict[i] = "v" in d and matches(expected[i], d["v"])
            undecided -= 1
        return [v is True for v in verdict]
