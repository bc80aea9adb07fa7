"""JSON from untrusted files with bounds: size, nesting depth, strict UTF-8 and no lone surrogates.

``json.loads`` alone accepts any size, recurses until Python's recursion limit (a ``RecursionError``, which callers
do not expect) and turns ``"\\ud800"`` escapes into strings that cannot be encoded back to UTF-8 (so a later JSON
response or tokenizer call fails far from the cause). Every file the service reads from a client goes through
``loads_bounded``, which raises one error type whose message can be shown to the client.
"""

from __future__ import annotations

import json
import re
from typing import Any

# Lone UTF-16 surrogates: valid in a Python str, never in UTF-8 text.
SURROGATE = re.compile(r"[\ud800-\udfff]")


class BoundedJSONError(ValueError):
    """JSON that is malformed or over a bound; the message says which, without echoing the content."""


def check_tree(value: Any, max_depth: int) -> None:
    """Refuse a parsed JSON value nested deeper than ``max_depth`` or holding a lone surrogate in any string (the
    message names where, e.g. ``inputs[0].data[1]``).

    Iterative, so a deep value cannot exhaust the stack here either.
    """
    stack: list[tuple[Any, int, tuple[str | int, ...]]] = [(value, 1, ())]
    while stack:
        node, depth, path = stack.pop()
        if isinstance(node, str):
            if SURROGATE.search(node):
                raise BoundedJSONError(f"{_where(path)} holds a lone surrogate (not valid Unicode text)")
        elif isinstance(node, dict | list):
            if depth > max_depth:
                raise BoundedJSONError(f"nested deeper than {max_depth} levels")
            if isinstance(node, dict):
                for key, item in node.items():
                    stack.append((key, depth, path))
                    stack.append((item, depth + 1, (*path, key)))
            else:
                stack.extend((item, depth + 1, (*path, index)) for index, item in enumerate(node))


def _where(path: tuple[str | int, ...]) -> str:
    if not path:
        return "a string"
    text = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in path).lstrip(".")
    return f"the string at {text[:200]}"


def loads_bounded(data: str | bytes, *, max_depth: int, max_bytes: int | None = None) -> Any:
    """Parse ``data`` as JSON within the bounds, or raise :class:`BoundedJSONError`."""
    size = len(data)
    if max_bytes is not None and size > max_bytes:
        raise BoundedJSONError(f"{size} bytes is more than the limit of {max_bytes}")
    if isinstance(data, bytes):
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise BoundedJSONError(f"not UTF-8 text (byte {exc.start})") from None
    else:
        text = data
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BoundedJSONError(f"not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    except RecursionError:
        raise BoundedJSONError(f"nested deeper than {max_depth} levels") from None
    check_tree(value, max_depth)
    return value
