"""Keys and values of token prefixes seen before, shared across requests (design: docs/prefix-cache.md).

Blocks of `block_tokens` tokens are keyed by a hash chain, as in vLLM's automatic prefix caching: a block's
key is the hash of its parent's key and its own tokens (the first block's parent is the tenant salt), so a
key names the whole prefix up to the end of its block, and the longest cached prefix of a prompt is found by
hashing its blocks in order until one is missing. Only full blocks are cached.

Memory is bounded (`max_bytes`). A block in use (`refs` > 0: a running sequence holds the chain it read or
wrote) is never evicted; unused blocks wait in least-recently-used order and are evicted oldest first.
A chain is released deepest block first, so the deeper blocks of a prefix are evicted before the shallower
ones that other prompts are more likely to share.

Not thread-safe: one engine thread owns it (the counters may be read from anywhere).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(eq=False, slots=True)
class Block:
    key: bytes
    data: np.ndarray  # [layers, 2, kv_heads, block_tokens, head_dim]
    refs: int = 0


class PrefixCache:
    def __init__(self, block_tokens: int, block_bytes: int, max_bytes: int) -> None:
        if block_tokens < 1:
            raise ValueError("block_tokens must be positive")
        self.block_tokens = block_tokens
        self.block_bytes = block_bytes
        self.max_blocks = max_bytes // block_bytes if block_bytes else 0
        self._blocks: dict[bytes, Block] = {}
        self._unused: OrderedDict[bytes, None] = OrderedDict()  # refs == 0, least recently used first
        #: Counters since start.
        self.lookups = 0
        self.hit_lookups = 0
        self.reused_tokens = 0
        self.inserted = 0
        self.evictions = 0

    # -- keys -------------------------------------------------------------------------------------------
    def keys(self, tokens: Sequence[int], salt: str | None, blocks: int) -> list[bytes]:
        """The chain keys of the first `blocks` full blocks of `tokens`."""
        keys: list[bytes] = []
        parent = hashlib.blake2b((salt or "").encode(), digest_size=16, person=b"frugal-kv").digest()
        size = self.block_tokens
        for i in range(blocks):
            chunk = np.asarray(tokens[i * size:(i + 1) * size], dtype=np.int32).tobytes()
            parent = hashlib.blake2b(parent + chunk, digest_size=16).digest()
            keys.append(parent)
        return keys

    # -- use --------------------------------------------------------------------------------------------
    def lookup(self, keys: list[bytes]) -> list[Block]:
        """The longest cached prefix of a chain, acquired (release it when done)."""
        found: list[Block] = []
        for key in keys:
            block = self._blocks.get(key)
            if block is None:
                break
            self._acquire(block)
            found.append(block)
        self.lookups += 1
        self.hit_lookups += bool(found)
        self.reused_tokens += len(found) * self.block_tokens
        return found

    def insert(self, key: bytes, data: np.ndarray) -> Block | None:
        """Cache a block (acquired); the existing block when the key is cached already; None when the
        budget is full of blocks in use."""
        block = self._blocks.get(key)
        if block is not None:
            self._acquire(block)
            return block
        if len(self._blocks) >= self.max_blocks and not self._evict_one():
            return None
        block = Block(key, data, refs=1)
        self._blocks[key] = block
        self.inserted += 1
        return block

    def release(self, chain: list[Block]) -> None:
        """Give back a chain acquired by `lookup`/`insert`, deepest block first."""
        for block in reversed(chain):
            block.refs -= 1
            if block.refs == 0 and block.key in self._blocks:
                self._unused[block.key] = None

    def _acquire(self, block: Block) -> None:
        block.refs += 1
        self._unused.pop(block.key, None)

    def _evict_one(self) -> bool:
        if not self._unused:
            return False
        key, _ = self._unused.popitem(last=False)
        del self._blocks[key]
        self.evictions += 1
        return True

    # -- state ------------------------------------------------------------------------------------------
    @property
    def blocks(self) -> int:
        return len(self._blocks)

    @property
    def bytes_held(self) -> int:
        return len(self._blocks) * self.block_bytes

    @property
    def blocks_in_use(self) -> int:
        return len(self._blocks) - len(self._unused)
