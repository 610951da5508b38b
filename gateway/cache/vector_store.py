"""The in-process vector store under both semantic indexes: one matrix per partition, exact best match.

Lookup speed. A float32 scan of 100k × 384 rows reads 154 MB (measured 8.2 ms on the 2-core dev box).
A partition past `PROJECT_MIN_ROWS` rows also keeps its rows projected onto the top `PROJECTED_DIM`
principal axes of its own contents (64 of 384 dimensions, a quarter of the bytes), and the norm of what
each row loses in that projection. For unit vectors q and x split into projected and residual parts,

    q·x = Pq·Px + rq·rx ≤ Pq·Px + |rq|·|rx|        (Cauchy–Schwarz)

so only the rows whose bound reaches the threshold can match, and those few are scored exactly in float32.
The answer is the same as a full scan's; the projection only decides how much is read (measured on
MiniLM embeddings of real questions: ~11 candidates of 100k at threshold 0.85, 0.5 ms; see
docs/semantic-cache.md). The basis is refitted when a partition has grown fourfold since the last fit.

Eviction: soonest expiry first (with equal TTLs, oldest first), not LRU. A hit does not make a cached
answer fresher, and in Redis mode LRU would turn every lookup into a shared write.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field

import numpy as np

DIM = 384
PROJECTED_DIM = 64
#: Below this a partition is scanned in full: a 4k-row float32 scan is ~0.3 ms, less than a fit costs.
PROJECT_MIN_ROWS = 4096
#: Slack for float32 rounding in the bound, so that rounding never prunes a true match.
BOUND_SLACK = 1e-4


def unit(vector: np.ndarray, dim: int = DIM) -> np.ndarray:
    """`vector` as a float32 unit vector of `dim` values (ValueError for a wrong shape or a zero vector)."""
    v = np.asarray(vector, dtype=np.float32).reshape(-1)
    if v.shape != (dim,):
        raise ValueError(f"expected a vector of {dim} values, got shape {np.shape(vector)}")
    norm = float(np.linalg.norm(v))
    if not math.isfinite(norm) or norm == 0.0:
        raise ValueError("cannot index a zero or non-finite vector")
    return v / norm


@dataclass(slots=True)
class _Partition:
    """The rows of one partition; rows [0, n) are live, removal moves the last row into the hole."""

    dim: int
    vectors: np.ndarray = field(init=False)
    expires: np.ndarray = field(init=False)
    idents: list[str] = field(default_factory=list)
    basis: np.ndarray | None = None  # [dim, PROJECTED_DIM] when projected
    projected: np.ndarray | None = None  # [capacity, PROJECTED_DIM]
    residual: np.ndarray | None = None  # [capacity] norms of what the projection loses
    fitted_at: int = 0

    def __post_init__(self) -> None:
        self.vectors = np.zeros((16, self.dim), dtype=np.float32)
        self.expires = np.zeros(16, dtype=np.float64)

    @property
    def n(self) -> int:
        return len(self.idents)

    def append(self, ident: str, vector: np.ndarray, expires_at: float) -> int:
        row = self.n
        if row == len(self.vectors):
            self._grow(2 * row)
        self.vectors[row] = vector
        self.expires[row] = expires_at
        self.idents.append(ident)
        if self.basis is not None:
            self._project(row, row + 1)
        if self.n >= PROJECT_MIN_ROWS and self.n >= 4 * self.fitted_at:
            self._fit()
        return row

    def replace(self, row: int, vector: np.ndarray, expires_at: float) -> None:
        self.vectors[row] = vector
        self.expires[row] = expires_at
        if self.basis is not None:
            self._project(row, row + 1)

    def remove(self, row: int) -> str | None:
        """Remove `row`; returns the ident of the row moved into its place (None when it was the last)."""
        last = self.n - 1
        moved = None
        if row != last:
            moved = self.idents[last]
            self.idents[row] = moved
            self.vectors[row] = self.vectors[last]
            self.expires[row] = self.expires[last]
            if self.projected is not None and self.residual is not None:
                self.projected[row] = self.projected[last]
                self.residual[row] = self.residual[last]
        self.idents.pop()
        return moved

    def _grow(self, capacity: int) -> None:
        def grown(a: np.ndarray) -> np.ndarray:
            out = np.zeros((capacity, *a.shape[1:]), dtype=a.dtype)
            out[: len(a)] = a
            return out

        self.vectors, self.expires = grown(self.vectors), grown(self.expires)
        if self.projected is not None and self.residual is not None:
            self.projected, self.residual = grown(self.projected), grown(self.residual)

    def _fit(self) -> None:
        """Principal axes of the rows (uncentred: the projection must keep the rows, mean included)."""
        live = self.vectors[: self.n]
        step = max(1, self.n // 8192)  # a sample is enough to find the axes
        sample = live[::step]
        _, axes = np.linalg.eigh(sample.T @ sample)
        self.basis = np.ascontiguousarray(axes[:, ::-1][:, :PROJECTED_DIM], dtype=np.float32)
        self.projected = np.zeros((len(self.vectors), PROJECTED_DIM), dtype=np.float32)
        self.residual = np.zeros(len(self.vectors), dtype=np.float32)
        self.fitted_at = self.n
        self._project(0, self.n)

    def _project(self, start: int, stop: int) -> None:
        assert self.basis is not None and self.projected is not None and self.residual is not None
        p = self.vectors[start:stop] @ self.basis
        self.projected[start:stop] = p
        self.residual[start:stop] = np.sqrt(np.maximum(0.0, 1.0 - np.einsum("ij,ij->i", p, p)))

    def best(self, query: np.ndarray, threshold: float, now: float) -> tuple[int, float] | None:
        """The live row most similar to `query` with similarity ≥ threshold, exactly as a full scan."""
        n = self.n
        if n == 0:
            return None
        if self.basis is None or self.projected is None or self.residual is None:
            rows = None
            scores = self.vectors[:n] @ query
        else:
            pq = query @ self.basis
            rq = math.sqrt(max(0.0, 1.0 - float(pq @ pq)))
            bound = self.projected[:n] @ pq + rq * self.residual[:n]
            rows = np.flatnonzero(bound >= threshold - BOUND_SLACK)
            if len(rows) == 0:
                return None
            scores = self.vectors[rows] @ query
        scores = np.where((scores >= threshold) & (self.expires[rows if rows is not None else slice(0, n)] > now),
                          scores, -np.inf)
        pick = int(np.argmax(scores))
        if not math.isfinite(float(scores[pick])):
            return None
        row = int(rows[pick]) if rows is not None else pick
        return row, float(scores[pick])


class VectorStore:
    """Entries (partition, ident, unit vector, expiry) with exact best-match lookup, bounded in size.

    Not thread-safe by itself: the indexes hold a lock around every call.
    """

    def __init__(self, max_entries: int, dim: int = DIM) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self.max_entries = max_entries
        self.dim = dim
        self._partitions: dict[str, _Partition] = {}
        self._where: dict[str, tuple[str, int, int, float]] = {}  # ident -> (partition, row, version, expiry)
        self._keys: dict[str, str] = {}  # ident -> entry key
        self._expiry: list[tuple[float, int, str]] = []  # heap of (expires_at, version, ident), lazily cleaned
        self._version = 0

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, ident: str) -> bool:
        return ident in self._where

    def put(self, ident: str, partition: str, vector: np.ndarray, entry_key: str, expires_at: float) -> list[str]:
        """Insert or replace an entry; returns the idents evicted to stay within `max_entries`."""
        self._version += 1
        current = self._where.get(ident)
        if current is not None and current[0] != partition:
            self.remove(ident)
            current = None
        if current is None:
            part = self._partitions.get(partition)
            if part is None:
                part = self._partitions[partition] = _Partition(self.dim)
            row = part.append(ident, vector, expires_at)
        else:
            row = current[1]
            self._partitions[partition].replace(row, vector, expires_at)
        self._where[ident] = (partition, row, self._version, expires_at)
        self._keys[ident] = entry_key
        heapq.heappush(self._expiry, (expires_at, self._version, ident))
        if len(self._expiry) > 2 * len(self._where) + 1024:  # replaced entries left stale items behind
            self._expiry = [(w[3], w[2], i) for i, w in self._where.items()]
            heapq.heapify(self._expiry)
        evicted = []
        while len(self._where) > self.max_entries:
            victim = self._pop_soonest()
            if victim is None:
                break
            evicted.append(victim)
        return evicted

    def remove(self, ident: str) -> bool:
        where = self._where.pop(ident, None)
        if where is None:
            return False
        partition, row = where[0], where[1]
        self._keys.pop(ident, None)
        part = self._partitions[partition]
        moved = part.remove(row)
        if moved is not None:
            _, _, version, expires_at = self._where[moved]
            self._where[moved] = (partition, row, version, expires_at)
        if part.n == 0:
            del self._partitions[partition]
        return True

    def expire(self, now: float) -> list[str]:
        """Remove every entry whose expiry is ≤ now; returns their idents."""
        gone = []
        while self._expiry and self._expiry[0][0] <= now:
            ident = self._pop_if_live()
            if ident is not None:
                gone.append(ident)
        return gone

    def _pop_soonest(self) -> str | None:
        """Remove the live entry that expires first."""
        while self._expiry:
            ident = self._pop_if_live()
            if ident is not None:
                return ident
        return None

    def _pop_if_live(self) -> str | None:
        """Pop the heap's top; remove its entry unless the item is stale (the entry was replaced or is gone)."""
        _, version, ident = heapq.heappop(self._expiry)
        where = self._where.get(ident)
        if where is None or where[2] != version:
            return None
        self.remove(ident)
        return ident

    def best(self, partition: str, query: np.ndarray, threshold: float, now: float) -> tuple[str, float] | None:
        """(entry key, cosine) of the best live entry of `partition` at or above `threshold`."""
        part = self._partitions.get(partition)
        if part is None:
            return None
        found = part.best(query, threshold, now)
        if found is None:
            return None
        row, similarity = found
        return self._keys[part.idents[row]], similarity
