"""SSE splitting and stream reassembly, on awkward byte boundaries."""

from __future__ import annotations

import json
import time

import pytest

from proxy.sse import parse_sse, reassemble_stream

STREAM = (
    b'data: {"id":"c1","model":"m","choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}\r\n\r\n'
    b': keep-alive comment\n\n'
    b'data: {"id":"c1","choices":[{"index":0,"delta":{"content":"Hel"}}]}\n\n'
    b'data: {"id":"c1","choices":[{"index":0,"delta":{"content":"lo \xe2\x9c\x93"}}]}\n\n'
    b'data: {"id":"c1","choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"id":"t1","function":{"name":"f","arguments":"{\\"a\\""}}]}}]}\n\n'
    b'data: {"id":"c1","choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":": 1}"}}]}}]}\n\n'
    b'data: {"id":"c1","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2}}\n\n'
    b"data: [DONE]\n\n"
)


@pytest.mark.parametrize("size", [1, 2, 3, 7, 64, len(STREAM)])
def test_split_anywhere_gives_the_same_events(size):
    chunks = [(i / 1000, STREAM[i : i + size]) for i in range(0, len(STREAM), size)]
    events = parse_sse(chunks)
    assert len(events) == 7
    assert events[-1]["data"] == "[DONE]"
    result = reassemble_stream("/v1/chat/completions", events)
    assert result.answer["content"] == "Hello ✓"
    assert result.answer["tool_calls"] == [
        {"id": "t1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}]
    assert result.usage == {"prompt_tokens": 3, "completion_tokens": 2}
    assert result.response_id == "c1" and result.model == "m"
    assert result.first_token_at is not None


@pytest.mark.parametrize("raw", [
    b"data: a\r\ndata: b\r\n\r\nevent: e\r\ndata: c\r\n\r\n",
    b"data: a\rdata: b\r\revent: e\rdata: c\r\r",
    b"data: a\ndata: b\n\nevent: e\ndata: c\n\n",
    b"data: a\r\ndata: b\n\revent: e\rdata: c\n\r\n",
], ids=["crlf", "cr", "lf", "mixed"])
def test_line_ends_split_between_chunks_change_nothing(raw):
    """A CR that ends one chunk ends its line; an LF that opens the next is the rest of that
    CRLF, not a blank line (which would end the event early)."""
    want = [(None, "a\nb"), ("e", "c")]
    for cut in range(len(raw) + 1):
        for chunks in ([raw[:cut], raw[cut:]], [raw[:cut], b"", raw[cut:]]):
            events = parse_sse([(float(i), c) for i, c in enumerate(chunks)])
            assert [(e["event"], e["data"]) for e in events] == want, (cut, chunks)
    singles = parse_sse([(float(i), raw[i : i + 1]) for i in range(len(raw))])
    assert [(e["event"], e["data"]) for e in singles] == want


def test_an_event_completes_with_the_cr_that_ends_its_blank_line():
    events = parse_sse([(1.0, b"data: a\r"), (2.0, b"\n\r"), (3.0, b"\ndata: b\r"), (4.0, b"\r")])
    assert [(e["t"], e["data"]) for e in events] == [(2.0, "a"), (4.0, "b")]


def test_a_long_line_in_small_pieces_costs_its_length():
    """4 MiB of one line in 1 KiB chunks: ~0.02 s scanning each chunk once, 13 s when the
    pending line was re-split on every chunk (the observer stalled behind a dripping stream).
    The bound is CPU time and ~100x the linear cost, so a busy machine does not trip it."""
    size = 4 * 1024 * 1024
    chunks = [(0.0, b"data: ")] + [(0.0, b"x" * 1024)] * (size // 1024) + [(1.0, b"\n\n")]
    start = time.process_time()
    [event] = parse_sse(chunks)
    assert time.process_time() - start < 2.0
    assert len(event["data"]) == size and event["t"] == 1.0


def test_multiline_data_named_events_and_a_cut_stream():
    raw = b"event: one\ndata: a\ndata: b\n\nevent: two\ndata: {\"x\": 1}"
    events = parse_sse([(0.5, raw)])
    # The last event lost its blank line when the stream was cut: it is still returned whole.
    assert [(e["event"], e["data"]) for e in events] == [("one", "a\nb"), ("two", '{"x": 1}')]


def test_responses_stream_reassembles_text_and_usage():
    final = {"id": "r1", "model": "m", "output": [{"type": "message", "content": [
        {"type": "output_text", "text": "Hi there"}]}], "usage": {"input_tokens": 2}}
    raw = "".join([
        f"event: response.output_text.delta\ndata: {json.dumps({'type': 'response.output_text.delta', 'delta': 'Hi'})}\n\n",
        f"event: response.completed\ndata: {json.dumps({'type': 'response.completed', 'response': final})}\n\n",
    ]).encode()
    result = reassemble_stream("/v1/responses", parse_sse([(0.1, raw)]))
    assert result.answer == {"role": "assistant", "content": "Hi there"}
    assert result.usage == {"input_tokens": 2} and result.response_id == "r1"
