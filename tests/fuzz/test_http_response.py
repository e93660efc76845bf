"""Fuzz target: HTTP/1 response heads and their framing (the upstream side of the proxy), compiled
build, Python source and httptools compared as for requests (tests/fuzz/test_http_request.py)."""

from __future__ import annotations

from tests.fuzz import http1
from tests.fuzz.engine import Target, corpus_test, fuzz_test

TARGET = Target("http_response", http1.differential(response=True), http1.responses, http1.DICTIONARY)
test_fuzz_http_response = fuzz_test(TARGET, examples=600)
test_corpus_http_response = corpus_test(TARGET)
