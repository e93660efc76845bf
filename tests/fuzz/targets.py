"""The fuzz targets by name (each in tests/fuzz/test_<name>.py, with its pytest tests)."""

from __future__ import annotations

import importlib

from tests.fuzz.engine import Target

NAMES = ("http_request", "http_response", "mdns", "dns", "websocket", "labels", "control", "snapshot", "jwt",
         "grpc")


def load(name: str) -> Target:
    """The Target of tests/fuzz/test_<name>.py."""
    return importlib.import_module(f"tests.fuzz.test_{name}").TARGET
