"""The one socket factory: options, cleanup on failure, monitors on unique addresses."""

from __future__ import annotations

import time

import pytest
import zmq

from tether.core.sockets import close_monitor, monitor_socket, open_socket


def test_options_are_set_by_their_zeromq_names():
    ctx = zmq.Context()
    try:
        sock = open_socket(ctx, zmq.DEALER, SNDHWM=123, IMMEDIATE=1)
        assert sock.getsockopt(zmq.LINGER) == 0
        assert sock.getsockopt(zmq.SNDHWM) == 123 and sock.getsockopt(zmq.IMMEDIATE) == 1
        sock.close()
    finally:
        ctx.term()


def test_a_failed_bind_closes_the_socket_and_raises():
    ctx = zmq.Context()
    try:
        first = open_socket(ctx, zmq.ROUTER, bind="tcp://127.0.0.1:*")
        taken = first.getsockopt_string(zmq.LAST_ENDPOINT)
        with pytest.raises(zmq.ZMQError):
            open_socket(ctx, zmq.ROUTER, bind=taken)
        with pytest.raises(AttributeError):
            open_socket(ctx, zmq.ROUTER, NO_SUCH_OPTION=1)
        first.close()
    finally:
        ctx.term()           # would hang if a failed socket had been left open


def test_monitors_get_fresh_addresses_and_see_connections():
    ctx = zmq.Context()
    try:
        server = open_socket(ctx, zmq.ROUTER, bind="tcp://127.0.0.1:*")
        endpoint = server.getsockopt_string(zmq.LAST_ENDPOINT)
        client = open_socket(ctx, zmq.DEALER)
        mon = monitor_socket(client, zmq.EVENT_CONNECTED)
        other = monitor_socket(open_socket(ctx, zmq.DEALER), zmq.EVENT_CONNECTED)
        assert mon.getsockopt_string(zmq.LAST_ENDPOINT) != other.getsockopt_string(zmq.LAST_ENDPOINT)
        client.connect(endpoint)
        assert mon.poll(5000), "no CONNECTED event"
        close_monitor(client, mon)
        assert mon.closed
        for s in (client, server, other):
            s.close()
        close_monitor(client, mon)         # twice, owner closed: no error
    finally:
        ctx.destroy(linger=0)



def _dead_peer_watch(ctx):
    """A DEALER retrying a closed port every millisecond and its monitor of the retries."""
    sock = open_socket(ctx, zmq.DEALER, RECONNECT_IVL=1)
    mon = monitor_socket(sock, zmq.EVENT_CONNECT_RETRIED)
    sock.connect("tcp://127.0.0.1:9")
    return sock, mon


def _drain(mon) -> int:
    count = 0
    while mon.poll(0):
        mon.recv_multipart()
        count += 1
    return count


def test_an_unread_monitor_never_stalls_the_context():
    """libzmq's I/O thread sends monitor events blocking: with pyzmq's bounded PAIR an idle
    client retrying a dead peer filled it (2010 events) and every later connection on the
    context hung (CI: a leaked EdgeClient stopped the suite's clients)."""
    ctx = zmq.Context()
    try:
        unread, unread_mon = _dead_peer_watch(ctx)
        gauge, gauge_mon = _dead_peer_watch(ctx)      # read: how many events the other holds
        seen, deadline = 0, time.monotonic() + 40
        while seen < 3000 and time.monotonic() < deadline:
            time.sleep(0.5)
            seen += _drain(gauge_mon)
        server = open_socket(ctx, zmq.ROUTER, bind="tcp://127.0.0.1:*")
        client = open_socket(ctx, zmq.DEALER, connect=server.getsockopt_string(zmq.LAST_ENDPOINT))
        client.send(b"still served")
        assert server.poll(5000), "a new connection was never made: the I/O thread is stuck"
        queued = _drain(unread_mon)
        assert queued > 2010, f"only {queued} events queued: the test did not pass the old bound"
        for sock, mon in ((unread, unread_mon), (gauge, gauge_mon)):
            close_monitor(sock, mon)
            sock.close()
        server.close()
        client.close()
    finally:
        ctx.destroy(linger=0)
