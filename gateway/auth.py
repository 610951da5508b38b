"""Client API keys: `Authorization: Bearer <key>` (or `x-api-key`), matched by SHA-256 digest."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass

from starlette.requests import Request

from gateway.errors import unauthorized
from gateway.settings import AuthConfig

log = logging.getLogger("frugal.auth")


@dataclass(frozen=True, slots=True)
class Client:
    """Who is calling: a key id from the config (never the key itself)."""

    key_id: str
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None


ANONYMOUS = Client("anonymous")


class KeyStore:
    def __init__(self, config: AuthConfig, default_rpm: int | None, default_tpm: int | None = None) -> None:
        self.required = config.required
        self._by_digest: dict[str, Client] = {}
        for key in config.keys:
            digest = key.digest()
            if digest is None:
                log.warning("key %r: environment variable %s is not set; the key is disabled", key.id, key.key_env)
                continue
            self._by_digest[digest] = Client(key.id, key.requests_per_minute or default_rpm,
                                             key.tokens_per_minute or default_tpm)
        self._anonymous = Client(ANONYMOUS.key_id, default_rpm, default_tpm)

    def __len__(self) -> int:
        return len(self._by_digest)

    def authenticate(self, request: Request) -> Client:
        """The calling client, or 401."""
        header = request.headers.get("authorization")
        secret = None
        if header:
            scheme, _, value = header.partition(" ")
            if scheme.lower() == "bearer" and value.strip():
                secret = value.strip()
        if secret is None:
            secret = request.headers.get("x-api-key")
        if secret is None:
            if not self.required:
                return self._anonymous
            raise unauthorized(
                "You didn't provide an API key. Send it as 'Authorization: Bearer YOUR_KEY'."
            )
        client = self._by_digest.get(hashlib.sha256(secret.encode()).hexdigest())
        if client is None:
            if not self.required:
                return self._anonymous
            raise unauthorized("Incorrect API key provided.")
        return client
