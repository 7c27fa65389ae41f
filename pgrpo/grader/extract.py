"""Code extraction from a model response.

Rules (kept deliberately close to the benchmark's "```python\\n<code>\\n```" format instruction):
- Complete `<think>...</think>` sections are dropped first, so scratch code in reasoning never counts.
- A fence is ``` + optional language tag + newline. Blocks tagged python/py/python3 are preferred; if the
  response has none, untagged blocks count; blocks in other languages never count.
- The LAST qualifying block is the answer (a model that drafts and then corrects itself is graded on the
  correction; concatenating drafts would duplicate class definitions).
- An unterminated last block (generation hit the token limit) is accepted up to the end of the text.
- No qualifying block, or one that is only whitespace -> no code (format_ok False).
"""
import re

_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+.-]*)[ \t]*\r?\n")
_THINK = re.compile(r"<think>.*?</think>", re.DOTALL)
PY_TAGS = ("python", "py", "python3")


def extract_code(response: str):
    """Return the code of the answer block, or None when the response has no usable block."""
    if not isinstance(response, str):
        return None
    text = _THINK.sub("", response)
    tagged, untagged = [], []
    pos = 0
    while True:
        m = _FENCE.search(text, pos)
        if m is None:
            break
        start = m.end()
        end = text.find("```", start)
        body = text[start:] if end == -1 else text[start:end]
        lang = m.group(1).lower()
        if lang in PY_TAGS:
            tagged.append(body)
        elif lang == "":
            untagged.append(body)
        if end == -1:
            break
        pos = end + 3
    blocks = tagged or untagged
    if not blocks or not blocks[-1].strip():
        return None
    return blocks[-1]
