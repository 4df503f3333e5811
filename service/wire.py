"""JSON on the hot path: the images response, and the job, result and step-event records
the Redis queue carries between processes.

orjson encodes an 8-image response or result 25x faster than the stdlib's json and
decodes it 2x faster (`loadtest/HISTORY.md`, seventh pass). Where the two differ:

- NaN and the infinities encode as null (the stdlib writes `NaN`, which is not JSON and
  which FastAPI's own responses refuse with a 500);
- text is written as UTF-8, not as \\u escapes (both decode the same);
- integers must fit in 64 bits (seeds do: at most 2**63 - 1); a larger one raises
  TypeError instead of being written;
- dict keys that are not strings are written as strings, as the stdlib does;
- numbers orjson does not take itself (numpy's scalars, other float subclasses) are written
  as the int or float they equal, where the stdlib writes float subclasses and refuses
  numpy's integers.

Request bodies are still parsed by the stdlib (json.loads), as FastAPI parses them, so a
client's malformed JSON gets the same 4xx message on every route.
"""

from __future__ import annotations

import numbers
from typing import Any

import orjson

_OPTIONS = orjson.OPT_NON_STR_KEYS


def _number(obj: Any) -> int | float:
    if isinstance(obj, numbers.Integral):
        return int(obj)
    if isinstance(obj, numbers.Real):
        return float(obj)
    raise TypeError(f"Object of type {type(obj).__name__} is not JSON serializable")


def dumps(obj: Any) -> bytes:
    """UTF-8 JSON of obj (see the module doc for where it differs from json.dumps)."""
    return orjson.dumps(obj, default=_number, option=_OPTIONS)


def loads(data: bytes | str) -> Any:
    """The value of a JSON document (bytes or str)."""
    return orjson.loads(data)
