"""The fuzzing harness shared by the targets: a target is a `check(data: bytes)` that raises on a
finding (an oracle, not just "did not crash"), a hypothesis strategy of structured inputs, and a
corpus of seed files in tests/fuzz/corpus/<name>/.

The same check runs three ways: under pytest (hypothesis, derandomized, a few seconds per target,
then every corpus file replayed), by `python3 -m tests.fuzz` (hypothesis with fresh seeds for a time
budget, then atheris, libFuzzer's coverage-guided mutation, when its wheel is installed), and as a
regression test per finding (the input kept in the corpus).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from hypothesis import strategies as st

CORPUS = Path(__file__).resolve().parent / "corpus"
# Bytes that change how a parser splits its input: edits made from them (and byte flips) turn seeds
# into the inputs a hostile peer would send.
NASTY = (b"\r", b"\n", b"\r\n", b"\r\n\r\n", b" ", b"\t", b":", b"\x00", b"\x7f", b"\xff", b"\xc0", b",",
         b"0", b"-1", b"9" * 20, b"\x3f", b"\xc0\x0c", b"\x00\x00")


@dataclass(frozen=True)
class Target:
    """One parser under test: `check` raises AssertionError (or anything unexpected) on a finding."""

    name: str
    check: Callable[[bytes], None]
    strategy: st.SearchStrategy = field(repr=False)
    dictionary: tuple[bytes, ...] = ()   # tokens the mutators insert (and atheris' -dict)

    def seeds(self) -> list[bytes]:
        """The corpus files' bytes, in name order."""
        folder = CORPUS / self.name
        return [p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()] if folder.is_dir() else []

    def inputs(self) -> st.SearchStrategy:
        """Structured inputs, and corpus seeds with a few edits."""
        seeds = self.seeds()
        if not seeds:
            return self.strategy
        return st.one_of(self.strategy, mutations(seeds, NASTY + self.dictionary))


@st.composite
def mutations(draw, seeds: list[bytes], tokens: tuple[bytes, ...]) -> bytes:
    """A seed with 0-4 edits: a token inserted or written over, a span deleted or doubled, a byte set."""
    data = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(0, 4))):
        at = draw(st.integers(0, len(data)))
        kind = draw(st.integers(0, 4))
        if kind == 0:
            data[at:at] = draw(st.sampled_from(tokens))
        elif kind == 1:
            token = draw(st.sampled_from(tokens))
            data[at:at + len(token)] = token
        elif kind == 2:
            del data[at:at + draw(st.integers(1, 8))]
        elif kind == 3:
            data[at:at] = data[at:at + draw(st.integers(1, 16))]
        elif at < len(data):
            data[at] = draw(st.integers(0, 255))
    return bytes(data)


class Counted:
    """check() with a count of calls and the last input that failed (hypothesis replays the shrunk
    one last, so that is the minimal finding)."""

    def __init__(self, target: Target):
        self.target = target
        self.runs = 0
        self.failed: bytes | None = None

    def __call__(self, data: bytes) -> None:
        self.runs += 1
        try:
            self.target.check(data)
        except BaseException:
            self.failed = data
            raise


def run_hypothesis(target: Target, seconds: float, first_seed: int = 0) -> tuple[int, list[bytes]]:
    """Fuzz with hypothesis for about `seconds`, a fresh random seed per batch: (executions, findings)."""
    from hypothesis import HealthCheck, given, seed, settings

    counted = Counted(target)
    findings: list[bytes] = []
    deadline = time.monotonic() + seconds
    batch = first_seed
    while time.monotonic() < deadline:
        @seed(batch)
        @settings(max_examples=500, deadline=None, database=None, derandomize=False,
                  suppress_health_check=list(HealthCheck), print_blob=False)
        @given(target.inputs())
        def one(data: bytes) -> None:
            counted(data)

        try:
            one()
        except Exception:   # noqa: BLE001 - a finding: keep its (shrunk) input, go on fuzzing
            if counted.failed is not None and counted.failed not in findings:
                findings.append(counted.failed)
        batch += 1
    return counted.runs, findings


def fuzz_test(target: Target, examples: int) -> Callable[[], None]:
    """A pytest test: `examples` inputs, the same ones on every run (derandomized, no database)."""
    from hypothesis import HealthCheck, given, settings

    @settings(max_examples=examples, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(target.inputs())
    def test(data: bytes) -> None:
        target.check(data)

    test.__name__ = f"test_fuzz_{target.name}"
    return test


def corpus_test(target: Target) -> Callable[[], None]:
    """A pytest test replaying every corpus file (the seeds and the regressions kept there)."""
    def test() -> None:
        seeds = target.seeds()
        assert seeds, f"no corpus in {CORPUS / target.name}"
        for data in seeds:
            target.check(data)

    test.__name__ = f"test_corpus_{target.name}"
    return test
