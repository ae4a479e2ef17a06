"""Reading a JSON request body the server parses itself (the reference ``/inference_*``
endpoints and ``/v1/audio/speech``): an object, or a 400 a person can act on.

Python's own messages (codec names, parser wording, ``sys.set_int_max_str_digits``) never reach
the client; the message says where the body went wrong. Nesting too deep for the parser is a
400 as well, not a RecursionError, and ``NaN`` / ``Infinity``, which Python accepts but JSON
does not have, are refused.
"""

from __future__ import annotations

import json
from typing import Any

from service.errors import ServiceError, bad_request


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def parse_json_object(data: bytes, example: str) -> dict[str, Any]:
    """The body as a dict; ``example``: a short valid body, shown when it is not an object."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise _malformed(f"it is not UTF-8 text (byte {error.start})") from None
    try:
        value = json.loads(text, parse_constant=_no_constants)
    except json.JSONDecodeError as error:
        raise _malformed(f"it is not valid JSON at line {error.lineno}, column {error.colno}"
                         ) from None
    except RecursionError:
        raise _malformed("it is nested too deeply") from None
    except ValueError as error:  # NaN / Infinity, or an integer of thousands of digits
        reason = str(error) if "JSON number" in str(error) else "a number has too many digits"
        raise _malformed(reason) from None
    if not isinstance(value, dict):
        raise bad_request(f"the JSON body must be an object such as {example}")
    return value


def _malformed(reason: str) -> ServiceError:
    return bad_request(f"the JSON body is malformed: {reason}")


def json_type(value: Any) -> str:
    """JSON's name for the type of a parsed value (for messages: never a Python type name)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return "an array" if isinstance(value, list) else "an object"
