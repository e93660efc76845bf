"""Fuzz target: HTTP/1 request heads and their framing, three ways. The compiled build's whole-head
path (scan_fields and its callers), the same functions run from the Python source, and httptools
(what the pure build, and the compiled one for anything not taken whole, parses with) must agree: a
request taken whole is httptools' request, with the same method, target, version, fields, keep-alive
and body length; the two builds take the same requests whole, split the same way."""

from __future__ import annotations

from tests.fuzz import http1
from tests.fuzz.engine import Target, corpus_test, fuzz_test

TARGET = Target("http_request", http1.differential(response=False), http1.requests, http1.DICTIONARY)
test_fuzz_http_request = fuzz_test(TARGET, examples=600)
test_corpus_http_request = corpus_test(TARGET)
