"""The backend fixtures: every cache and decoder test takes ``xp`` (and ``device``).

Tests are parametrized over numpy, array_api_strict, torch (cpu), torch-cuda and
cupy. A backend that cannot run here is skipped with its reason (not installed;
no GPU), decided up front by ``kvcache_xp.load_backend`` (``cupy.is_available()``,
``torch.cuda.is_available()``), never by catching a crash mid-test.

``pytest --backend NAME`` (repeatable) runs only the named backends. The
environment variable ``KVCACHE_XP_REQUIRE_BACKENDS`` (comma-separated names) turns
the skip of a named backend into a failure: CI sets it so that a backend whose
install silently broke cannot pass as "skipped".
"""

from __future__ import annotations

import os

import pytest
from hypothesis import settings

from kvcache_xp import BACKEND_NAMES, BackendUnavailableError, load_backend

# Shared CI machines are noisy and the first call on a backend imports it:
# hypothesis deadlines would flake there. Example counts stay hypothesis' own.
settings.register_profile("kvcache_xp", deadline=None, print_blob=True)
settings.load_profile("kvcache_xp")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--backend",
        action="append",
        default=[],
        choices=BACKEND_NAMES,
        help="run only this array backend (repeatable); default: all available",
    )


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "backend" in metafunc.fixturenames:
        names = metafunc.config.getoption("backend") or list(BACKEND_NAMES)
        metafunc.parametrize("backend", names, indirect=True, ids=names)


def _required_backends() -> set[str]:
    raw = os.environ.get("KVCACHE_XP_REQUIRE_BACKENDS", "")
    return {name.strip() for name in raw.split(",") if name.strip()}


@pytest.fixture
def backend(request: pytest.FixtureRequest):
    try:
        return load_backend(request.param)
    except BackendUnavailableError as exc:
        if request.param in _required_backends():
            pytest.fail(f"{request.param} is required (KVCACHE_XP_REQUIRE_BACKENDS): {exc}")
        pytest.skip(f"{request.param}: {exc}")


@pytest.fixture
def xp(backend):
    """The backend's array namespace (array-api-compat wrapper or array_api_strict)."""
    return backend.xp


@pytest.fixture
def device(backend):
    """The device arrays of this backend are created on (None: the default)."""
    return backend.device
