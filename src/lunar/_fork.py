"""Fork safety: what a child process (``os.fork``: gunicorn ``--preload``, celery's prefork
pool, multiprocessing's ``fork`` start method) must not share with its parent.

One mechanism, and no cost per request: objects that hold sockets, threads or locks register
here once, when made (``track``), and one hook that ``os.register_at_fork`` runs in every
child right after the fork resets them there. The registry holds them weakly, so it keeps no
client alive. (A pid compared at each checkout of a connection would find a fork too, at a
cost on every request; the hook misses only a fork made outside Python, by C code calling
``fork()`` itself, which then runs no Python before ``exec``.)

The parent's connections are left to the parent: in the child no byte is written to them, and
they are not closed "properly" either (``shutdown()``, a TLS close_notify, or an event loop's
``remove_reader`` on the epoll instance the two processes share would all reach the parent's
use of them). Their descriptors are pointed at ``/dev/null`` instead (``dup2``): the child no
longer holds the connections, so the parent's close still ends them, and whatever the child
might still do with those numbers reaches nothing. The objects themselves are kept for the
child's life, never used, so that no destructor of theirs runs.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

_T = TypeVar("_T")

#: Each registered object, and what resets it in a child. Weak keys: a client dropped is
#: forgotten here too.
_resets: weakref.WeakKeyDictionary[Any, Callable[[Any], None]] = weakref.WeakKeyDictionary()

#: The parent's connections and pools, in a child: kept, never used (see the module's text).
_inherited: list[object] = []


def track(obj: _T, reset: Callable[[_T], None]) -> _T:
    """Have ``reset(obj)`` run in every child process forked from now on (once per fork)."""
    _resets[obj] = reset
    return obj


def disown(objects: object, sockets: Iterable[Any]) -> None:
    """In a child: keep the parent's ``objects`` (never to be used), and point each of
    ``sockets`` (anything with ``fileno()``) at ``/dev/null``, quietly (see the module's
    text)."""
    _inherited.append(objects)
    null = -1
    try:
        for sock in sockets:
            if sock is None:
                continue
            try:
                fd = sock.fileno()
            except (OSError, ValueError):
                continue
            if fd < 0:
                continue
            if null < 0:
                null = os.open(os.devnull, os.O_RDWR)
            os.dup2(null, fd, inheritable=False)
    finally:
        if null >= 0:
            os.close(null)


def _after_fork_in_child() -> None:
    failed: BaseException | None = None
    for obj, reset in list(_resets.items()):
        try:
            reset(obj)
        except Exception as exc:  # the others are reset all the same
            failed = failed or exc
    if failed is not None:
        raise failed  # Python reports an at-fork hook's exception, and goes on


if hasattr(os, "register_at_fork"):  # not on Windows, which has no fork
    os.register_at_fork(after_in_child=_after_fork_in_child)


# ---------------------------------------------------------------------------------------------
# httpx's clients (Lunar's own sync client, and the async one when a proxy is configured)


def reset_httpx(client: Any) -> None:
    """An httpx client (sync or async) made by Lunar, in a child: its pools forget the
    parent's connections (disowned), the requests of the parent's threads waiting for one,
    and their lock, which another thread of the parent may have held at the fork. A stream
    the forking thread had open ends with a connection error if read on in the child."""
    for transport in (client._transport, *client._mounts.values()):
        pool = getattr(transport, "_pool", None)
        if pool is None or not hasattr(pool, "_connections"):
            continue
        connections = pool._connections
        pool._connections = []
        # Those still waiting were the parent's threads' (the forking thread waits on
        # none); the others stay, so that closing a response opened before the fork finds
        # its own.
        pool._requests = [r for r in pool._requests if not r.is_queued()]
        pool._optional_thread_lock = type(pool._optional_thread_lock)()
        disown(connections, _httpcore_sockets(connections))


def _httpcore_sockets(connections: list[Any]) -> Iterable[Any]:
    for conn in connections:
        # HTTPConnection (a proxy's wraps one more) -> HTTP11Connection / HTTP2Connection,
        # which holds the network stream.
        for _ in range(4):
            stream = getattr(conn, "_network_stream", None)
            if stream is not None:
                sock = stream.get_extra_info("socket")
                if sock is not None:
                    yield sock
                break
            conn = getattr(conn, "_connection", None)
            if conn is None:
                break
