"""Token buckets keyed by source address or claim token, in this process (a replica's share).

Memory is bounded: at most ``max_keys`` buckets, the least recently used forgotten first (a
forgotten key starts again with a full bucket, which only ever admits a few more requests).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class _Bucket:
    tokens: float
    updated: float
    refusing: bool = False


@dataclass(frozen=True)
class Decision:
    allowed: bool
    retry_after_s: float
    first_refusal: bool
    """True for the first refusal after an allowed request: worth one audit event, not every one."""


class KeyedBuckets:
    def __init__(
        self, rate: float, burst: int, *, max_keys: int = 100_000, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.rate, self.burst, self.max_keys, self.clock = rate, burst, max_keys, clock
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()
        self._lock = threading.Lock()

    def take(self, key: str) -> Decision:
        now = self.clock()
        with self._lock:
            bucket = self._buckets.pop(key, None) or _Bucket(float(self.burst), now)
            self._buckets[key] = bucket
            if len(self._buckets) > self.max_keys:
                self._buckets.popitem(last=False)
            bucket.tokens = min(float(self.burst), bucket.tokens + (now - bucket.updated) * self.rate)
            bucket.updated = now
            if bucket.tokens >= 1:
                bucket.tokens -= 1
                bucket.refusing = False
                return Decision(True, 0.0, False)
            first = not bucket.refusing
            bucket.refusing = True
            return Decision(False, (1 - bucket.tokens) / self.rate, first)
