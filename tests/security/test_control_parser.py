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


def test_a_request_of_exactly_64_kib_is_read_and_one_byte_more_is_refused():
    request = b'{"op": "status"}'
    assert MAX_REQUEST == 65536
    assert parse_request(request + b" " * (65536 - len(request))) == Request("status")
    with pytest.raises(RequestError) as caught:
        parse_request(request + b" " * (65537 - len(request)))
    assert str(caught.value) == "request longer than 65536 bytes"


@pytest.mark.parametrize("data, error", [
    (b'{"op": "status", "op": "status"}', "field 'op' appears twice"),
    (b'{"op": "status", "x": Infinity}', "Infinity is not valid JSON"),
    (b'{"op": "status", "x": -Infinity}', "-Infinity is not valid JSON"),
    (b"[" * 30000, "request is nested too deeply"),
    (b'{"op": "status"', "request is not one line of UTF-8 JSON"),
    (b"\xc3", "request is not one line of UTF-8 JSON"),
    (b"null", "request must be a JSON object"),
    (b'{"op": "reboot"}', "unknown op; expected one of ping, rotate, status"),
    (b'{"op": null}', "unknown op; expected one of ping, rotate, status"),
    (b'{"op": "ping", "all": true}', "op ping: unknown field 'all'"),
    (b'{"op": "status", "zeta": 1, "alpha": 2}', "op status: unknown field 'alpha'"),
    (b'{"op": "rotate", "all": true, "' + b"u" * 40 + b'": 1}', f"op rotate: unknown field {'u' * 40!r}"),
    (b'{"op": "rotate", "all": true, "' + b"u" * 41 + b'": 1}', "op rotate: unknown field '(unprintable)'"),
    (b'{"op": "rotate", "all": true, "url\\u001b[2J": 1}', "op rotate: unknown field '(unprintable)'"),
    (b'{"op": "rotate", "all": "yes"}', "op rotate: field 'all' must be true or false"),
    (b'{"op": "rotate", "client": ""}',
     "op rotate: field 'client' must be a client name (letters, digits, '.', '_', '-')"),
    (b'{"op": "rotate", "client": "-billing"}',
     "op rotate: field 'client' must be a client name (letters, digits, '.', '_', '-')"),
    (b'{"op": "rotate", "client": "' + b"b" * 101 + b'"}',
     "op rotate: field 'client' must be a client name (letters, digits, '.', '_', '-')"),
    (b'{"op": "rotate", "all": false}', "op rotate: give either client or all: true"),
    (b'{"op": "rotate", "all": true, "verify": true}', "op rotate: verify needs compromised"),
])
def test_each_refusal_is_its_own_exact_one_line_message(data, error):
    """The message is what the CLI shows the operator: it names the problem and never echoes the request."""
    with pytest.raises(RequestError) as caught:
        parse_request(data)
    assert str(caught.value) == error and caught.value.__cause__ is None


def test_every_field_of_a_rotate_request_is_read():
    request = parse_request(b'{"op": "rotate", "client": "billing.eu_1-a", "compromised": true, '
                            b'"accept_unrevoked": true, "reload_credentials": true, "verify": true}')
    assert request == Request("rotate", client="billing.eu_1-a", compromised=True, accept_unrevoked=True,
                              reload_credentials=True, verify=True)
    assert not request.all
    assert parse_request(b'{"op": "rotate", "client": "' + b"b" * 100 + b'"}').client == "b" * 100
    assert parse_request(b'{"op": "rotate", "all": true, "compromised": false}') == Request("rotate", all=True)
    assert parse_request(b'{"op": "ping"}') == Request("ping")
    assert FLAGS == ("all", "compromised", "accept_unrevoked", "reload_credentials", "verify")


def test_a_request_encodes_to_its_smallest_message_on_one_line():
    assert Request("status").message() == {"op": "status"}
    assert Request("rotate", all=True).encode() == b'{"op": "rotate", "all": true}\n'
    assert Request("rotate", client="billing", compromised=True, verify=True).message() == {
        "op": "rotate", "client": "billing", "compromised": True, "verify": True}


def test_the_verb_names_a_compromise_rotation():
    """The verb is what the control log and audit line call a request."""
    assert Request("rotate", client="billing", compromised=True).verb == "rotate --compromised"
    assert Request("rotate", client="billing").verb == "rotate"
    assert Request("status").verb == "status"
    assert Request("status", compromised=True).verb == "status"
