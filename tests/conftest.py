"""Shared fixtures: keep the engine's on-disk cache out of the user's home during tests."""

import pytest


@pytest.fixture(autouse=True, scope="session")
def _private_cache_dir(tmp_path_factory):
    # A session-wide MonkeyPatch: the built-in fixture is function-scoped.
    patch = pytest.MonkeyPatch()
    patch.setenv("NST_CACHE_DIR", str(tmp_path_factory.mktemp("nst-cache")))
    yield
    patch.undo()
