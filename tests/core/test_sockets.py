"""The one socket factory: options, cleanup on failure, monitors on unique addresses."""

from __future__ import annotations

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
