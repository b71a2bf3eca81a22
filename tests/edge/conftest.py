from __future__ import annotations

import pytest

from support.bundles import shared_bundle


@pytest.fixture(scope="session")
def bundle(tmp_path_factory):
    return shared_bundle(tmp_path_factory)
