"""The one socket factory: every ZeroMQ socket of tether is made here.

    open_socket(ctx, zmq.DEALER, connect="tcp://...")      linger 0 unless told otherwise
    open_socket(ctx, zmq.ROUTER, bind="tcp://...", ROUTER_MANDATORY=1)
    monitor_socket(sock, events)                             PAIR that receives sock's events
    close_monitor(sock, monitor)                             stop the monitor, close its PAIR

Options are ZeroMQ socket option names (``SNDHWM=10000``) so every call reads like the
ZeroMQ manual. Works for ``zmq.Context`` and ``zmq.asyncio.Context`` alike.
"""

from __future__ import annotations

import itertools
import os
from typing import Any, TypeVar

import zmq

S = TypeVar("S", bound=zmq.Socket)

_MONITORS = itertools.count(1)


def open_socket(ctx: zmq.Context, kind: int, *, bind: str | None = None,
                connect: str | None = None, linger_ms: int = 0, **options: Any) -> Any:
    """A new socket of ``kind`` with LINGER ``linger_ms`` and ``options`` set, then bound or
    connected; closed again (and the error raised) when binding or connecting fails."""
    sock = ctx.socket(kind)
    try:
        sock.setsockopt(zmq.LINGER, linger_ms)
        for name, value in options.items():
            sock.setsockopt(getattr(zmq, name), value)
        if bind is not None:
            sock.bind(bind)
        if connect is not None:
            sock.connect(connect)
    except (zmq.ZMQError, AttributeError):
        sock.close(linger=0)
        raise
    return sock


def monitor_socket(sock: S, events: int) -> S:
    """A PAIR socket receiving ``sock``'s connection ``events`` (``zmq.utils.monitor``).

    Its queue is unbounded (RCVHWM 0): libzmq's I/O thread sends monitor events blocking,
    so a full queue nobody reads (an idle client whose peer is gone retries its connect,
    one event each time) would stop that thread and with it every connection of the
    context. Its inproc address is unique for the life of the process: pyzmq's default
    names it after the socket's file descriptor, which the kernel reuses as soon as a
    socket closes, so a new monitor could attach to the address of one libzmq is still
    tearing down (and the context then never terminates).
    """
    address = f"inproc://tether-monitor-{os.getpid()}-{next(_MONITORS)}"
    sock.monitor(address, events)
    try:
        return open_socket(sock.context, zmq.PAIR, connect=address, RCVHWM=0)
    except zmq.ZMQError:
        sock.disable_monitor()
        raise


def close_monitor(sock: zmq.Socket, monitor: zmq.Socket) -> None:
    """Stop ``sock``'s monitor (libzmq closes its own end) and close ``monitor``."""
    try:
        sock.disable_monitor()
    except zmq.ZMQError:
        pass                    # ``sock`` is already closed: its monitor went with it
    monitor.close(linger=0)


__all__ = ["close_monitor", "monitor_socket", "open_socket"]
