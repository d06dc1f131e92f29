"""The stall watchdog: output passes through in order, a source that stops producing fails with the
caller's description, the source's own errors come through unchanged, and stopping early closes
the source."""

from __future__ import annotations

import threading
import time

import pytest

from pipeline.cluster.watchdog import PipelineStalled, iter_until_stalled


def _describe(seconds: float) -> str:
    return f"nothing for {seconds:.1f} s"


def test_items_pass_through_in_order() -> None:
    assert list(iter_until_stalled(range(50), 5.0, _describe)) == list(range(50))
    assert list(iter_until_stalled(iter("abc"), None, _describe)) == ["a", "b", "c"]


def test_a_stalled_source_fails_with_the_description() -> None:
    release = threading.Event()

    def hangs():
        yield 1
        yield 2
        release.wait(30)  # a pipeline that stopped producing
        yield 3

    got = []
    began = time.monotonic()
    with pytest.raises(PipelineStalled, match=r"nothing for 0\.[3-9] s"):
        for item in iter_until_stalled(hangs(), 0.3, _describe):
            got.append(item)
    assert got == [1, 2]
    assert time.monotonic() - began < 5
    release.set()


def test_slow_but_steady_output_is_not_a_stall() -> None:
    def steady():
        for i in range(4):
            time.sleep(0.15)
            yield i

    # each item is within the timeout, though all of them together are not
    assert list(iter_until_stalled(steady(), 0.4, _describe)) == [0, 1, 2, 3]


def test_errors_of_the_source_come_through() -> None:
    def broken():
        yield 1
        raise KeyError("shard 7")

    with pytest.raises(KeyError, match="shard 7"):
        list(iter_until_stalled(broken(), 5.0, _describe))


def test_stopping_early_closes_the_source() -> None:
    closed = threading.Event()

    def endless():
        try:
            i = 0
            while True:
                yield i
                i += 1
        finally:
            closed.set()

    for item in iter_until_stalled(endless(), 5.0, _describe):
        if item == 3:
            break
    assert closed.wait(5)
