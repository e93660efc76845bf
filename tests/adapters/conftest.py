"""Fixtures of the adapter tests."""

from __future__ import annotations

import pytest

from .loops import LOOPS, make_runner


@pytest.fixture(params=sorted(LOOPS))
def run(request):
    """run(async_fn, *args) runs it to completion on a fresh loop of the parametrized kind."""
    return make_runner(request.param)
