"""The incremental parsers the clients stream through, as tables."""

from __future__ import annotations

import pytest

import gantry
from gantry._common import LineSplitter, SseParser, sse_event


def test_sse_events_from_lines() -> None:
    lines = [
        ": keep-alive",
        "",
        "id: 7",
        "event: job",
        'data: {"index": 7,',
        'data: "state": "running"}',
        "",
        "id: 8\r",
        "data:plain",
        "",
        "",
    ]
    parser = SseParser()
    events = [e for e in (parser.feed(line) for line in lines) if e is not None]
    assert events == [
        ("7", "job", '{"index": 7,\n"state": "running"}'),
        ("8", "message", "plain"),
    ]
    event = sse_event("job", '{"index": 7, "state": "running", "job_id": 3}')
    assert event is not None and (event.index, event.state, event.job_id) == (7, "running", 3)
    assert sse_event("message", "{}") is None
    with pytest.raises(gantry.Unavailable):
        sse_event("error", '{"error": "not leader; the leader is http://a"}')


@pytest.mark.parametrize(
    ("chunks", "lines"),
    [
        ([b"a\nb\n"], ["a", "b"]),
        ([b"a", b"b\nc"], ["ab", "c"]),
        ([b"\xe2\x82", b"\xac\n"], ["\u20ac"]),
        ([b"bad \xff\n"], ["bad \ufffd"]),
        ([b"\n\n"], ["", ""]),
        ([], []),
    ],
)
def test_log_lines_from_chunks(chunks: list[bytes], lines: list[str]) -> None:
    splitter = LineSplitter()
    out = [line for chunk in chunks for line in splitter.feed(chunk)]
    assert out + splitter.flush() == lines
