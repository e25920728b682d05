"""API keys: ``Authorization: Bearer <key>`` or ``x-api-key: <key>``, compared in constant time."""

from __future__ import annotations

import hmac

from starlette.datastructures import Headers

from llmserve.errors import AuthenticationError


class ApiKeys:
    def __init__(self, keys: tuple[str, ...]) -> None:
        self._keys = [k.encode() for k in keys]

    def __bool__(self) -> bool:
        return bool(self._keys)

    def check(self, headers: Headers) -> str:
        """The matching key's name (``key-1``, ``key-2``, ...: what rate limits count per), or
        raise AuthenticationError (401 invalid_api_key)."""
        offered = presented_key(headers)
        if offered is None:
            raise AuthenticationError(
                "missing API key: send 'Authorization: Bearer <key>' or 'x-api-key: <key>'"
            )
        candidate = offered.encode()
        matched = 0
        # every key is compared, so the time taken says nothing about which one came close
        for number, key in enumerate(self._keys, start=1):
            if hmac.compare_digest(candidate, key):
                matched = number
        if not matched:
            raise AuthenticationError("invalid API key")
        return f"key-{matched}"


def presented_key(headers: Headers) -> str | None:
    authorization = headers.get("authorization", "")
    scheme, _, value = authorization.strip().partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    api_key = headers.get("x-api-key", "").strip()
    return api_key or None
