from __future__ import annotations

import pytest
import zmq

from tether.cloud import CloudConfig

from support.cloud import ServerThread, build_model


@pytest.fixture(scope="session")
def model():
    return build_model()


@pytest.fixture(scope="module")
def server(model):
    config = CloudConfig(bind="tcp://127.0.0.1:*", metrics_port=0, max_batch_size=8,
                         max_queue_delay_s=0.005, max_message_bytes=4 * 1024 * 1024)
    with ServerThread(config, [model.bundle()]) as srv:
        yield srv


@pytest.fixture
def ctx():
    context = zmq.Context()
    yield context
    context.destroy(linger=0)
