"""What stands between a client and the model: the bearer token, request limits, input masking.

Every refusal is a `Refused` with an HTTP status, a metric kind and a one-line reason for the
client; nothing here echoes the input back or lets a traceback out.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from dataclasses import dataclass
from typing import Any

TOKEN_ENV = "LMPIPE_SERVE_TOKEN"


class Refused(Exception):
    """A request the server will not serve: `status`, metric `kind`, a one-line `reason`."""

    def __init__(self, status: int, kind: str, reason: str) -> None:
        super().__init__(reason)
        self.status, self.kind, self.reason = status, kind, reason


@dataclass(frozen=True)
class Limits:
    """Request limits; every one is a flag of `lmpipe serve`."""

    max_body_bytes: int = 1 << 20
    """1 MiB, nginx's default: 64 long reviews are ~100 kB."""
    max_texts: int = 64
    """Texts per request; a bigger list is 413 (send it in several requests)."""
    max_chars: int = 20_000
    """Characters per text: the longest IMDB review has ~13,700."""


class BearerToken:
    """`Authorization: Bearer <token>` checked in constant time; no token configured = open."""

    def __init__(self, token: str | None) -> None:
        # SHA-256 digests of equal length: compare_digest never sees the token's length or a non-ASCII str
        self._digest = hashlib.sha256(token.encode("utf-8")).digest() if token else None

    @property
    def required(self) -> bool:
        return self._digest is not None

    def check(self, header: str | None) -> None:
        """Raise `Refused` 401 unless the header carries the token (or none is required)."""
        if self._digest is None:
            return
        scheme, _, given = (header or "").partition(" ")
        if scheme.lower() != "bearer" or not given:
            raise Refused(401, "unauthorized", "missing bearer token (Authorization: Bearer <token>)")
        digest = hashlib.sha256(_header_bytes(given.strip())).digest()
        if not hmac.compare_digest(digest, self._digest):
            raise Refused(401, "unauthorized", "invalid bearer token")


def _header_bytes(value: str) -> bytes:
    """The bytes the client sent: Starlette decodes headers as latin-1 (any other str: its UTF-8)."""
    try:
        return value.encode("latin-1")
    except UnicodeEncodeError:
        return value.encode("utf-8", "surrogatepass")


def check_length_header(value: str | None, limit: int) -> None:
    """413 before reading a body whose declared length is over `limit` bytes."""
    if value is None:
        return
    if not value.isdigit():
        raise Refused(400, "bad_request", "Content-Length is not a number")
    if int(value) > limit:
        raise Refused(413, "body_too_large", f"body of {int(value)} bytes > limit {limit}")


def parse_texts(body: bytes, limits: Limits) -> list[str]:
    """The texts of a /predict body: `{"text": "..."}` or `{"texts": ["...", ...]}`."""
    if len(body) > limits.max_body_bytes:
        raise Refused(413, "body_too_large", f"body of {len(body)} bytes > limit {limits.max_body_bytes}")
    try:
        payload = json.loads(body.decode("utf-8"))
    except UnicodeDecodeError:
        raise Refused(400, "bad_json", "body is not UTF-8") from None
    except RecursionError:
        raise Refused(400, "bad_json", "body is nested too deeply") from None
    except ValueError as exc:
        raise Refused(400, "bad_json", f"body is not JSON ({str(exc).splitlines()[0]})") from None
    if not isinstance(payload, dict):
        raise Refused(422, "bad_request", f'expected a JSON object {{"texts": [...]}}, got {_kind(payload)}')
    unknown = sorted(set(payload) - {"text", "texts"})
    if unknown:
        raise Refused(422, "bad_request", f"unknown key {unknown[0]!r} (expected 'text' or 'texts')")
    if ("text" in payload) == ("texts" in payload):
        raise Refused(422, "bad_request", "give exactly one of 'text' (a string) or 'texts' (a list of strings)")
    if "text" in payload:
        key, texts = "text", [payload["text"]]
    else:
        key, texts = "texts", payload["texts"]
        if not isinstance(texts, list):
            raise Refused(422, "bad_request", f"texts: expected a list of strings, got {_kind(texts)}")
        if not texts:
            raise Refused(422, "bad_request", "texts: empty list")
        if len(texts) > limits.max_texts:
            raise Refused(413, "too_many_texts", f"texts: {len(texts)} texts > limit {limits.max_texts} per request")
    for i, text in enumerate(texts):
        where = key if key == "text" else f"texts[{i}]"
        if not isinstance(text, str):
            raise Refused(422, "bad_request", f"{where}: expected a string, got {_kind(text)}")
        if not text.strip():
            raise Refused(422, "bad_request", f"{where}: empty text")
        if len(text) > limits.max_chars:
            raise Refused(422, "text_too_long", f"{where}: {len(text)} characters > limit {limits.max_chars}")
    return texts


def _kind(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number" if isinstance(value, (int, float)) else type(value).__name__)


EMAIL = re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+")
DIGITS = re.compile(r"\d")


def mask(text: str, limit: int = 200) -> str:
    """A text fit for a log: e-mail addresses and digits masked, one line, at most `limit` characters."""
    masked = DIGITS.sub("#", EMAIL.sub("<email>", text))
    flat = " ".join(masked.split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."
