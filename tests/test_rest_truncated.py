"""A multipart body cut short (no closing delimiter, or cut inside a part) is refused with 400,
never spoken as if it were whole: through the real gateway, and at the parser."""

from __future__ import annotations

import pytest
import requests

from service.compat import _parse_multipart
from service.errors import ServiceError

BOUNDARY = b"cosyvoice-test-boundary"
FULL = (b"--" + BOUNDARY + b"\r\nContent-Disposition: form-data; name=\"tts_text\"\r\n\r\n"
        b"Hello there, this is the whole text.\r\n"
        + b"--" + BOUNDARY + b"\r\nContent-Disposition: form-data; name=\"spk_id\"\r\n\r\n"
        + "英文女".encode() + b"\r\n--" + BOUNDARY + b"--\r\n")
CUTS = {
    "no closing delimiter": FULL[: FULL.rindex(b"--" + BOUNDARY + b"--")],
    "cut inside a part": FULL[: FULL.index(b"whole") + 3],
    "cut inside the closing delimiter": FULL[:-6],
}


@pytest.mark.parametrize("name", CUTS)
def test_parser_refuses_truncated_bodies(name: str) -> None:
    with pytest.raises(ServiceError, match="truncated"):
        _parse_multipart(CUTS[name], BOUNDARY)
    fields, _ = _parse_multipart(FULL, BOUNDARY)
    assert dict(fields)["tts_text"] == "Hello there, this is the whole text."


@pytest.mark.parametrize("name", CUTS)
def test_gateway_answers_400_to_a_truncated_multipart_body(stack, name: str) -> None:
    headers = {**stack.headers,
               "Content-Type": f"multipart/form-data; boundary={BOUNDARY.decode()}"}
    reply = requests.post(f"{stack.rest_url}/inference_sft", data=CUTS[name], headers=headers,
                          timeout=60)
    assert reply.status_code == 400, reply.text[:200]
    assert "truncated" in reply.json()["message"]
