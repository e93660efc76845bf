"""Fixtures of the adapter tests."""

from __future__ import annotations

import time

import pytest

from certs.ca import CertificateAuthority

from .loops import LOOPS, make_runner


@pytest.fixture(params=sorted(LOOPS))
def run(request):
    """run(async_fn, *args) runs it to completion on a fresh loop of the parametrized kind."""
    return make_runner(request.param)


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    """A throwaway mesh CA (trust domain mesh.local), one per test module."""
    return CertificateAuthority.create("mesh.local", time.time())
