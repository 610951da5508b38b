"""Virtual keys and teams, created through the admin API and kept in SQL.

A key's secret (`sk-frugal-` and 32 random url-safe characters, ~190 bits) is returned once, when it is
created; the database keeps its SHA-256 (a fast hash is right for random secrets of this size: nothing to
brute-force) and a short prefix to tell keys apart. Requests are matched by digest through a short cache
(`cache_s`, default 0.5 s), so a key revoked or changed on one replica is refused by every replica within a
second, without a database read per request.
"""

from __future__ import annotations

import hashlib
import secrets
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Engine, Select, Table, insert, select, update
from sqlalchemy.exc import SQLAlchemyError

from gateway.tenants.tables import keys_table, teams_table
from gateway.tenants.ttl_cache import TtlCache

SECRET_PREFIX = "sk-frugal-"
#: Fields an operator may change on a key after it was created.
EDITABLE = ("name", "team_id", "models", "metadata", "requests_per_minute", "tokens_per_minute", "expires_at")


def digest_of(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def new_secret() -> str:
    return SECRET_PREFIX + secrets.token_urlsafe(24)


@dataclass(frozen=True, slots=True)
class VirtualKey:
    """What a request's key allows (no secret, no digest)."""

    id: str
    team_id: str | None
    #: Route and model names the key may call; None: every one.
    models: frozenset[str] | None
    requests_per_minute: int | None
    tokens_per_minute: int | None
    expires_at: datetime | None
    revoked: bool

    def expired(self, now: datetime) -> bool:
        return self.expires_at is not None and now >= self.expires_at


def _aware(value: datetime | None) -> datetime | None:
    return value.replace(tzinfo=UTC) if value is not None and value.tzinfo is None else value


def newest_first(table: Table, limit: int, after: tuple[str, str] | None) -> Select[Any]:
    """`limit` rows of `table`, newest first, created before the keyset cursor (created_at, id)."""
    c = table.c
    query = select(table).order_by(c.created_at.desc(), c.id.desc()).limit(limit)
    if after is not None:
        at = datetime.fromisoformat(after[0])
        query = query.where((c.created_at < at) | ((c.created_at == at) & (c.id < after[1])))
    return query


def key_view(row: dict[str, Any]) -> dict[str, Any]:
    """A key as the admin API shows it: never its digest."""
    out = {str(k): v for k, v in row.items() if k != "key_hash"}  # plain str keys: orjson refuses subclasses
    for name in ("expires_at", "revoked_at", "created_at"):
        value = _aware(out.get(name))
        out[name] = value.isoformat() if value is not None else None
    out["object"] = "key"
    return out


class KeysUnavailable(Exception):
    """The keys cannot be read (the database is unreachable), and this key was never read before."""


class VirtualKeys:
    def __init__(self, engine: Engine, cache_s: float = 0.5) -> None:
        self.engine = engine
        self._cache: TtlCache[str, VirtualKey | None] = TtlCache(cache_s)

    # -- the request path -----------------------------------------------------------------------------
    def cached(self, digest: str) -> tuple[VirtualKey | None] | None:
        """(the key or None) when the digest was looked up less than `cache_s` ago; None when it must be read."""
        return self._cache.fresh(digest)

    def lookup(self, digest: str) -> VirtualKey | None:
        """The key with this digest (None when there is none), read at most every `cache_s`. While the
        database cannot be read, what was last read (however old) answers; a digest never read raises
        `KeysUnavailable`."""
        hit = self.cached(digest)
        if hit is not None:
            return hit[0]
        try:
            with self.engine.connect() as connection:
                row = connection.execute(select(keys_table).where(keys_table.c.key_hash == digest)).first()
        except SQLAlchemyError as exc:
            stale = self._cache.stale(digest)
            if stale is None:
                raise KeysUnavailable(str(exc)) from exc
            return stale[0]
        key = None
        if row is not None:
            key = VirtualKey(row.id, row.team_id, frozenset(row.models) if row.models is not None else None,
                             row.requests_per_minute, row.tokens_per_minute, _aware(row.expires_at),
                             row.revoked_at is not None)
        self._cache.put(digest, key)
        return key

    # -- the admin API --------------------------------------------------------------------------------
    def create(self, *, name: str, team_id: str | None = None, models: list[str] | None = None,
               metadata: dict[str, Any] | None = None, requests_per_minute: int | None = None,
               tokens_per_minute: int | None = None, expires_at: datetime | None = None,
               ) -> tuple[dict[str, Any], str]:
        """A new key: its stored row (as the admin API shows it) and its secret, which is not kept."""
        secret = new_secret()
        values = {"id": "key_" + uuid.uuid4().hex[:20], "key_hash": digest_of(secret),
                  "prefix": secret[:len(SECRET_PREFIX) + 4], "name": name, "team_id": team_id, "models": models,
                  "metadata": metadata or {}, "requests_per_minute": requests_per_minute,
                  "tokens_per_minute": tokens_per_minute, "expires_at": expires_at, "revoked_at": None,
                  "created_at": datetime.now(UTC)}
        with self.engine.begin() as connection:
            connection.execute(insert(keys_table).values(**values))
        return key_view(values), secret

    def get(self, key_id: str) -> dict[str, Any] | None:
        with self.engine.connect() as connection:
            row = connection.execute(select(keys_table).where(keys_table.c.id == key_id)).first()
        return key_view(dict(row._mapping)) if row is not None else None

    def page(self, limit: int, after: tuple[str, str] | None = None, team_id: str | None = None,
             include_revoked: bool = False) -> list[dict[str, Any]]:
        """Newest first, `limit` keys created before the cursor (created_at, id)."""
        c = keys_table.c
        query = newest_first(keys_table, limit, after)
        if team_id is not None:
            query = query.where(c.team_id == team_id)
        if not include_revoked:
            query = query.where(c.revoked_at.is_(None))
        with self.engine.connect() as connection:
            return [key_view(dict(r._mapping)) for r in connection.execute(query)]

    def change(self, key_id: str, changes: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]] | None:
        """Apply `changes` (fields of `EDITABLE`, or `revoked_at`); (before, after), or None for no such key."""
        before = self.get(key_id)
        if before is None:
            return None
        with self.engine.begin() as connection:
            connection.execute(update(keys_table).where(keys_table.c.id == key_id).values(**changes))
        after = self.get(key_id)
        assert after is not None
        return before, after

    def revoke(self, key_id: str) -> tuple[dict[str, Any], dict[str, Any]] | None:
        current = self.get(key_id)
        if current is None or current["revoked_at"] is not None:
            return (current, current) if current is not None else None
        return self.change(key_id, {"revoked_at": datetime.now(UTC)})


def team_view(row: dict[str, Any]) -> dict[str, Any]:
    out = {str(k): v for k, v in row.items()}
    created = _aware(out.get("created_at"))
    out["created_at"] = created.isoformat() if created else None
    out["object"] = "team"
    return out


class Teams:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def create(self, name: str, metadata: dict[str, Any] | None = None) -> dict[str, Any]:
        values = {"id": "team_" + uuid.uuid4().hex[:20], "name": name, "metadata": metadata or {},
                  "created_at": datetime.now(UTC)}
        with self.engine.begin() as connection:
            connection.execute(insert(teams_table).values(**values))
        return team_view(values)

    def get(self, team_id: str) -> dict[str, Any] | None:
        with self.engine.connect() as connection:
            row = connection.execute(select(teams_table).where(teams_table.c.id == team_id)).first()
        return team_view(dict(row._mapping)) if row is not None else None

    def page(self, limit: int, after: tuple[str, str] | None = None) -> list[dict[str, Any]]:
        with self.engine.connect() as connection:
            return [team_view(dict(r._mapping)) for r in connection.execute(newest_first(teams_table, limit, after))]
