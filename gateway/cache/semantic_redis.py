"""The semantic index shared by gateway replicas through Redis.

Redis holds the truth; each replica keeps a numpy mirror (gateway/cache/vector_store.py) so that a
lookup costs one round trip plus a local search, not a transfer of vectors.

In Redis, under `prefix`:
- `e:<id>`: a hash per entry (partition, entry key, float32 vector, expiry), with a Redis TTL slightly past
  the entry's, so Redis reclaims it even if nothing else runs;
- `z`: a sorted set of entry ids by expiry: the bound (`max_entries`, soonest expiry evicted first) and the
  reclaim of expired entries, both applied atomically by the add script;
- `log`: a stream of changes (add with its payload, delete), capped near `log_len` events, each numbered
  by the counter `seq`. Before every lookup a replica reads the events after its cursor (one XREAD).
  A gap in the numbers (it fell behind by more than the capped stream holds) or a restarted count (Redis
  lost its data) makes it reload everything.
"""

from __future__ import annotations

import math
import threading
import time
from typing import TYPE_CHECKING, Any

import numpy as np

from gateway.cache.semantic_index import Clock, SemanticMatch, best_live, check_ttl, entry_ident
from gateway.cache.vector_store import DIM, VectorStore, unit

if TYPE_CHECKING:
    import redis.asyncio

#: Seconds a Redis entry outlives its own expiry (replica clocks differ a little; expiry itself is
#: checked against the stored time, so this only delays reclaiming).
REDIS_GRACE_S = 60
#: Entries fetched per pipeline while reloading a mirror.
RELOAD_BATCH = 1000
#: Seconds a call to Redis may take (connecting included): a Redis that hangs costs a lookup this long, then a
#: miss, never a hung request.
TIMEOUT_S = 1.0

# KEYS: zset, seq, log. ARGV: prefix, id, partition, entry key, vector, expires_at, redis ttl (s),
# max_entries, now, log_len.
_ADD = """
local z, seqk, log, prefix = KEYS[1], KEYS[2], KEYS[3], ARGV[1]
local function emit(fields)
  local s = redis.call('INCR', seqk)
  redis.call('XADD', log, 'MAXLEN', '~', ARGV[10], '*', 's', s, unpack(fields))
end
local function drop(id)
  redis.call('DEL', prefix .. 'e:' .. id)
  emit({'o', 'd', 'i', id})
end
local expired = redis.call('ZRANGEBYSCORE', z, '-inf', ARGV[9])
for _, id in ipairs(expired) do
  redis.call('ZREM', z, id)
  drop(id)
end
local key = prefix .. 'e:' .. ARGV[2]
redis.call('HSET', key, 'p', ARGV[3], 'k', ARGV[4], 'v', ARGV[5], 'x', ARGV[6])
redis.call('EXPIRE', key, ARGV[7])
redis.call('ZADD', z, ARGV[6], ARGV[2])
emit({'o', 'a', 'i', ARGV[2], 'p', ARGV[3], 'k', ARGV[4], 'v', ARGV[5], 'x', ARGV[6]})
local over = redis.call('ZCARD', z) - tonumber(ARGV[8])
if over > 0 then
  local popped = redis.call('ZPOPMIN', z, over)
  for i = 1, #popped, 2 do drop(popped[i]) end
end
return #expired
"""


class RedisSemanticIndex:
    """Entries and vectors in Redis, shared by every index on the same server and prefix.

    `len()` is the size of this replica's mirror as of its last lookup or add.
    """

    def __init__(self, url: str, *, prefix: str = "frugal:sem:", max_entries: int = 100_000,
                 clock: Clock = time.time, dim: int = DIM, log_len: int = 10_000,
                 client: redis.asyncio.Redis | None = None) -> None:
        from workers.redis_client import redis_client  # noqa: PLC0415 (the redis client, only when configured)

        if client is None:
            client = redis_client(url, TIMEOUT_S, trip_after=1)  # an optimisation: skip it at once
            self._owns_client = True
        else:
            self._owns_client = False
        self._client = client
        self._prefix = prefix
        self._zset, self._seq_key, self._log = prefix + "z", prefix + "seq", prefix + "log"
        self._max_entries = max_entries
        self._log_len = log_len
        self._clock = clock
        self._store = VectorStore(max_entries, dim)
        self._lock = threading.Lock()  # the mirror, against threads
        self._syncing: Any = None  # an asyncio.Lock, made on first use inside the running loop
        self._cursor: bytes | None = None  # stream id of the last applied event; None: not loaded yet
        self._seq = 0
        self._add_script = self._client.register_script(_ADD)

    async def lookup(self, partition: str, vector: np.ndarray, threshold: float) -> SemanticMatch | None:
        query = unit(vector, self._store.dim)
        await self.sync()
        return best_live(self._store, self._lock, self._clock, partition, query, threshold)

    async def add(self, partition: str, vector: np.ndarray, entry_key: str, ttl_s: float) -> None:
        check_ttl(ttl_s)
        row = unit(vector, self._store.dim)
        now = self._clock()
        await self._add_script(
            keys=[self._zset, self._seq_key, self._log],
            args=[self._prefix, entry_ident(partition, entry_key), partition, entry_key, row.tobytes(),
                  repr(now + ttl_s), math.ceil(ttl_s) + REDIS_GRACE_S, self._max_entries, repr(now),
                  self._log_len])
        await self.sync()

    async def sync(self) -> None:
        """Apply the changes other replicas (and this one) made since the last call."""
        import asyncio

        if self._syncing is None:
            self._syncing = asyncio.Lock()
        async with self._syncing:
            if self._cursor is None:
                await self._reload()
                return
            reply = await self._client.xread({self._log: self._cursor})
            events = reply[0][1] if reply else []
            if events and int(events[0][1][b"s"]) != self._seq + 1:
                # Fell behind the capped stream (a gap), or Redis lost its data (the count restarted).
                await self._reload()
                return
            with self._lock:
                for event_id, fields in events:
                    self._apply(fields)
                    self._cursor, self._seq = event_id, int(fields[b"s"])

    def _apply(self, fields: dict[bytes, bytes]) -> None:
        ident = fields[b"i"].decode()
        if fields[b"o"] == b"d":
            self._store.remove(ident)
            return
        _put(self._store, ident, fields)

    async def _reload(self) -> None:
        """Rebuild the mirror from Redis. Events after the cursor taken first are replayed afterwards;
        replaying is idempotent (an add replaces, a delete of a missing entry does nothing)."""
        last = await self._client.xrevrange(self._log, count=1)
        if last:
            cursor, seq = last[0][0], int(last[0][1][b"s"])
        else:
            cursor, seq = b"0-0", int(await self._client.get(self._seq_key) or 0)
        ids = [i.decode() for i in await self._client.zrange(self._zset, 0, -1)]
        store = VectorStore(self._max_entries, self._store.dim)
        for start in range(0, len(ids), RELOAD_BATCH):
            batch = ids[start:start + RELOAD_BATCH]
            pipe = self._client.pipeline(transaction=False)
            for ident in batch:
                pipe.hgetall(self._prefix + "e:" + ident)
            for ident, fields in zip(batch, await pipe.execute(), strict=True):
                if fields:  # gone since the id list was read
                    _put(store, ident, fields)
        with self._lock:
            self._store, self._cursor, self._seq = store, cursor, seq

    async def aclose(self) -> None:
        if self._owns_client:
            await self._client.aclose()
            await self._client.connection_pool.disconnect()

    def __len__(self) -> int:
        return len(self._store)


def _put(store: VectorStore, ident: str, fields: dict[bytes, bytes]) -> None:
    """Put an entry read from Redis (a hash or an add event: same fields) into a mirror."""
    vector = np.frombuffer(fields[b"v"], dtype=np.float32)
    if vector.shape != (store.dim,):
        return  # written by an index of another dimension: not ours to match
    store.put(ident, fields[b"p"].decode(), vector, fields[b"k"].decode(), float(fields[b"x"]))
