"""The control socket's request parser: strict about ops, fields and types, and nothing a peer
sends makes it raise anything but its own RequestError."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings as hsettings, strategies as st

from tokensmith.control_protocol import FIELDS, FLAGS, MAX_REQUEST, Request, RequestError, parse_request

CONSUMER = "consumer in the socket group"

names = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}", fullmatch=True)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=20)


@st.composite
def valid_requests(draw):
    op = draw(st.sampled_from(sorted(FIELDS)))
    if op != "rotate":
        return Request(op)
    everything = draw(st.booleans())
    compromised = draw(st.booleans())
    return Request("rotate", client=None if everything else draw(names), all=everything, compromised=compromised,
                   accept_unrevoked=draw(st.booleans()), reload_credentials=draw(st.booleans()),
                   verify=compromised and draw(st.booleans()))


@st.composite
def near_valid_messages(draw):
    """Valid requests with one field set to an arbitrary JSON value or one arbitrary field added."""
    message = draw(valid_requests()).message()
    key = draw(st.sampled_from(["op", "client", "url", "verify_url", *FLAGS]) | st.text(max_size=12))
    message[key] = draw(json_values)
    return message


def parses_or_refuses(data: bytes):
    try:
        return parse_request(data)
    except RequestError as exc:
        message = str(exc)
        assert message and "\n" not in message and len(message) < 200
        return None


@pytest.mark.security(threat=CONSUMER, claim="Arbitrary bytes on the control socket produce a request or the "
                                            "parser's own one-line RequestError, never another exception.")
@hsettings(max_examples=400, deadline=None)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_never_raise_anything_else(data):
    parses_or_refuses(data)


@pytest.mark.security(threat=CONSUMER, claim="A control request whose boolean field holds anything but a JSON "
                                            "boolean (\"false\", 0, null, a list) is refused, and no request can "
                                            "carry a field its op does not know, such as a URL.")
@hsettings(max_examples=600, deadline=None)
@given(near_valid_messages())
def test_fields_hold_only_their_own_types(message):
    request = parses_or_refuses(json.dumps(message).encode())
    if request is None:
        return
    assert set(message) <= {"op", *FIELDS[request.op]}
    for flag in FLAGS:
        if flag in message:
            assert isinstance(message[flag], bool) and getattr(request, flag) is message[flag]
    if "client" in message:
        assert isinstance(message["client"], str) and request.client == message["client"]


@pytest.mark.security(threat=CONSUMER, claim="Every valid control request survives encoding and parsing unchanged.")
@hsettings(max_examples=300, deadline=None)
@given(valid_requests())
def test_valid_requests_round_trip(request):
    assert parse_request(request.encode().rstrip(b"\n")) == request
    assert parse_request(json.dumps(request.message(), indent=1).encode()) == request


@pytest.mark.security(threat=CONSUMER, claim="Strings, numbers and null in boolean fields are refused instead of "
                                            "being read as true (\"compromised\": \"false\" used to mean true).")
@pytest.mark.parametrize("value", ["false", "true", 0, 1, None, [], {}, "", 0.0])
def test_non_boolean_flags_are_refused(value):
    for flag in FLAGS:
        with pytest.raises(RequestError, match=flag):
            parse_request(json.dumps({"op": "rotate", "client": "billing", "compromised": True, flag: value}).encode())


@pytest.mark.security(threat=CONSUMER, claim="A deeply nested control request is refused with a RequestError "
                                            "instead of a RecursionError.")
@pytest.mark.parametrize("opener", ["[", '{"a":'])
def test_deep_nesting_is_a_request_error(opener):
    with pytest.raises(RequestError, match="nested|longer|JSON"):
        parse_request((opener * 30000).encode())
    with pytest.raises(RequestError):
        parse_request(b'{"op": "status", "x": ' + b"[" * 10000 + b"]" * 10000 + b"}")


@pytest.mark.parametrize("message, error", [
    ({"op": "rotate", "client": "billing", "verify_url": "http://127.0.0.1:1/"}, "unknown field 'verify_url'"),
    ({"op": "status", "client": "billing"}, "unknown field 'client'"),
    ({"op": "shutdown"}, "unknown op"),
    ({"op": ["rotate"]}, "unknown op"),
    ({}, "unknown op"),
    ({"op": "rotate"}, "either client or all"),
    ({"op": "rotate", "client": "billing", "all": True}, "either client or all"),
    ({"op": "rotate", "client": "../../etc/passwd"}, "client name"),
    ({"op": "rotate", "client": "billing\n"}, "client name"),
    ({"op": "rotate", "client": 7}, "client name"),
    ({"op": "rotate", "client": "billing", "verify": True}, "verify needs compromised"),
])
def test_malformed_requests_name_the_problem(message, error):
    with pytest.raises(RequestError, match=error):
        parse_request(json.dumps(message).encode())


@pytest.mark.parametrize("data, error", [
    (b'{"op": "rotate", "client": "b", "compromised": false, "compromised": true}', "twice"),
    (b'{"op": "status", "x": NaN}', "not valid JSON"),
    (b"\xff\xfe{}", "UTF-8 JSON"),
    (b"[1, 2]", "JSON object"),
    (b'"status"', "JSON object"),
    (b'{"op": "status"} trailing', "UTF-8 JSON"),
    (b" " * (MAX_REQUEST + 1), "longer than"),
])
def test_malformed_bytes_name_the_problem(data, error):
    with pytest.raises(RequestError, match=error):
        parse_request(data)
