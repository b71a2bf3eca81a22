from __future__ import annotations

import pytest

from support.bundles import shared_bundle

from support.procs import CloudHolder


@pytest.fixture(scope="session")
def bundle(tmp_path_factory):
    return shared_bundle(tmp_path_factory)


@pytest.fixture(scope="session")
def cloud(bundle, tmp_path_factory):
    """One real `tether cloud` process for the integration tests (restartable in place)."""
    holder = CloudHolder(bundle, tmp_path_factory.mktemp("cloud-logs"))
    yield holder
    holder.stop()
