"""The user database, as the serving broker asks it: a peer's user name and groups,
from a cache, or from NSS in a thread within the client's deadline.

NSS may block (LDAP, sssd, a hung nscd): the event loop never waits on it, and a lookup
that misses its deadline is remembered as "no answer" for USER_CACHE_SECONDS, so that
the next clients of that uid are not kept waiting too (uid and unit rules still hold).

Must never: block the event loop, keep more than USER_CACHE_ENTRIES uids, or give a
peer a name or groups its uid does not have in the user database.
"""

from __future__ import annotations

import os
import pwd
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING, Final, TypeAlias

import trio

if TYPE_CHECKING:
    from broker.daemon.identity import Peer

USER_CACHE_SECONDS: Final = 5.0
"""How long a uid's name and groups are reused: a group change reaches the policy within
this time, and a burst of grants costs one user-database lookup, not one each."""
USER_CACHE_ENTRIES: Final = 4096
"""Most uids cached; the least recently used goes first (a rootless-podman user may own
65,536 uids: cycling them must not evict everyone else)."""
USER_LOOKUP_THREADS: Final = 4
"""User-database lookups running at once, each in a thread: NSS may wait on LDAP or
sssd, and the event loop must not."""

Entry: TypeAlias = tuple[str | None, frozenset[int]]
"""A uid's user name (None if it has no entry) and its groups in the user database."""


def query(uid: int) -> Entry:
    """Ask the user database (may block): the name and groups of `uid`."""
    try:
        entry = pwd.getpwuid(uid)
    except KeyError:
        return None, frozenset()
    return entry.pw_name, frozenset(os.getgrouplist(entry.pw_name, entry.pw_gid))


class UserDatabase:
    """uid → `Entry`, cached for `ttl` seconds (LRU-bounded), NSS asked in a thread.

    Args:
        warn: Told (uid, message) of a lookup that missed its deadline (the ledger's
            `notice`: within that uid's logging budget).
        ttl: Seconds an answer is reused.
    """

    def __init__(self, warn: Callable[[int, str], None], ttl: float = USER_CACHE_SECONDS) -> None:
        self._warn = warn
        self._ttl = ttl
        self._cache: OrderedDict[int, tuple[float, str | None, frozenset[int]]] = OrderedDict()
        self._threads = trio.CapacityLimiter(USER_LOOKUP_THREADS)

    async def complete(self, peer: Peer, timeout: float) -> Peer:
        """Return `peer` with its user-database name and groups: at once from the cache
        (the common case), else from NSS in a thread; if NSS takes longer than
        `timeout` seconds, without them (and say so)."""
        hit = self.cached(peer.uid)
        if hit is None:
            with trio.move_on_after(timeout):
                hit = await trio.to_thread.run_sync(
                    query, peer.uid, limiter=self._threads, abandon_on_cancel=True
                )
            if hit is None:
                hit = (None, frozenset())
                self._warn(
                    peer.uid,
                    f"the user database did not answer for uid {peer.uid} within "
                    f"{timeout:g}s; going on without its user name and groups for "
                    f"{self._ttl:g}s (check NSS: sssd, LDAP, nscd)",
                )
            self.store(peer.uid, hit)
        return peer.with_user(*hit)

    def known(self, peer: Peer) -> Peer:
        """`peer` with its user-database name and groups if they are cached, else as it
        is: what can be known of it without a wait."""
        hit = self.cached(peer.uid)
        return peer.with_user(*hit) if hit else peer

    def cached(self, uid: int) -> Entry | None:
        """Return the cached entry of `uid`, or None if absent or stale."""
        hit = self._cache.get(uid)
        if hit is None or time.monotonic() - hit[0] >= self._ttl:
            return None
        self._cache.move_to_end(uid)
        return hit[1], hit[2]

    def store(self, uid: int, entry: Entry) -> None:
        """Cache `entry` for `uid`, evicting the least recently used past the bound."""
        self._cache[uid] = (time.monotonic(), *entry)
        self._cache.move_to_end(uid)
        while len(self._cache) > USER_CACHE_ENTRIES:
            self._cache.popitem(last=False)
