"""Parse JSON from untrusted bytes into exactly one of the project's errors.

Every reader of JSON (safetensors headers, sidecar metadata, shard maps, config.json, the resume
state, training data) meets the same three failures: bytes that are not UTF-8, text that is not
JSON (including a repeated key, when a ``hook`` refuses it), and nesting deep enough to exhaust
the recursion limit. This module turns each into the reader's own error class with its own words.

Example: ``parse_json(b'{"a": [', SidecarError, "x.safetensors: invalid JSON ({why})",
"x.safetensors: nested too deeply")`` raises ``SidecarError("x.safetensors: invalid JSON
(Expecting value: line 1 column 8 (char 7))")``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from neuroada_tools.errors import NeuroAdaError


def parse_json(raw: str | bytes, error: type[NeuroAdaError], invalid: str, nested: str,
               hook: Callable[[list[tuple[str, Any]]], Any] | None = None) -> Any:
    """``json.loads(raw)``, or ``error(invalid.format(why=...))`` / ``error(nested)``.

    ``raw`` bytes are decoded as UTF-8 first; a decoding error counts as invalid JSON.
    ``hook`` is passed as ``object_pairs_hook`` (e.g. to refuse duplicate keys with a ValueError).
    """
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
        return json.loads(text, object_pairs_hook=hook)
    except ValueError as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise error(invalid.format(why=e)) from None
    except RecursionError:
        raise error(nested) from None
