"""Every test session runs the data path's current compiled modules or its .py sources, never a
stale build: one older than its sources is rebuilt here, or the session stops before collecting."""

from __future__ import annotations

import pytest

from bench.env import ensure_compiled_data_path


def pytest_sessionstart(session: pytest.Session) -> None:
    try:
        ensure_compiled_data_path(missing_too=False)
    except RuntimeError as exc:
        pytest.exit(str(exc), returncode=pytest.ExitCode.USAGE_ERROR)
