"""Client API keys: `Authorization: Bearer <key>` (or `x-api-key`), matched by SHA-256 digest: the keys of
the config file first, then the virtual keys created through the admin API (`gateway.tenants.keys`)."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from datetime import UTC, datetime

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request

from gateway.errors import APIError, unauthorized
from gateway.settings import AuthConfig
from gateway.tenants.keys import KeysUnavailable, VirtualKey, VirtualKeys

log = logging.getLogger("frugal.auth")


@dataclass(frozen=True, slots=True)
class Client:
    """Who is calling: a key id (never the key itself), its team, and what it may call."""

    key_id: str
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    team_id: str | None = None
    #: Route and model names the key may call; None: every one.
    models: frozenset[str] | None = None

    def may_call(self, name: str) -> bool:
        return self.models is None or name in self.models


ANONYMOUS = Client("anonymous")


class KeyStore:
    def __init__(self, config: AuthConfig, default_rpm: int | None, default_tpm: int | None = None,
                 virtual: VirtualKeys | None = None) -> None:
        self.required = config.required
        self.virtual = virtual
        self._default_rpm, self._default_tpm = default_rpm, default_tpm
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

    async def authenticate(self, request: Request) -> Client:
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
        digest = hashlib.sha256(secret.encode()).hexdigest()
        client = self._by_digest.get(digest)
        if client is not None:
            return client
        if self.virtual is not None:
            hit = self.virtual.cached(digest)
            try:
                key = hit[0] if hit is not None else await run_in_threadpool(self.virtual.lookup, digest)
            except KeysUnavailable as exc:
                raise APIError(503, "API keys cannot be checked right now (the key store is unreachable); try "
                               "again shortly.", type="server_error", code="keys_unavailable",
                               retry_after_s=1) from exc
            if key is not None:
                return self._virtual_client(key)
        if not self.required:
            return self._anonymous
        raise unauthorized("Incorrect API key provided.")

    def _virtual_client(self, key: VirtualKey) -> Client:
        if key.revoked:
            raise unauthorized("This API key has been revoked.")
        if key.expired(datetime.now(UTC)):
            assert key.expires_at is not None
            raise unauthorized(f"This API key expired at {key.expires_at.isoformat()}.")
        return Client(key.id, key.requests_per_minute or self._default_rpm, key.tokens_per_minute or self._default_tpm,
                      key.team_id, key.models)
