"""Naming the field of a gRPC request protobuf cannot parse (cluster/grpc_decode.py)."""

from __future__ import annotations

import pytest
from google.protobuf.message import DecodeError
from hypothesis import given, settings
from hypothesis import strategies as st

from cluster.grpc_decode import Malformed, malformed
from proto.baton.v1 import serving_pb2 as pb

CHAT = pb.ChatInput(messages=[pb.ChatMessage(role="user", content="fine"),
                              pb.ChatMessage(role="user", content="QQ")])


@pytest.mark.parametrize("request_,field", [
    (pb.GenerateRequest(text="QQ"), "text"),
    (pb.GenerateRequest(request_id="QQ", text="x"), "request_id"),
    (pb.GenerateRequest(model="QQ", text="x"), "model"),
    (pb.GenerateRequest(chat=CHAT), "chat.messages[1].content"),
    (pb.GenerateRequest(text="x", sampling=pb.SamplingParams(stop=["a", "QQ"])),
     "sampling.stop[1]"),
    (pb.GenerateRequest(text="x", labels={"team": "QQ"}), "labels['team']"),
    (pb.GenerateRequest(text="x", labels={"QQ": "v"}), "labels"),
])
def test_the_string_that_is_not_utf8_is_named(request_, field):
    raw = request_.SerializeToString().replace(b"QQ", b"\xc3\x28")  # a broken 2-byte sequence
    with pytest.raises(DecodeError):
        pb.GenerateRequest.FromString(raw)
    assert malformed(pb.GenerateRequest, raw) == Malformed(field, "not valid UTF-8")


def test_bytes_that_are_no_message_blame_the_request():
    raw = b"\x1a\xff\xff\xff"  # field 3 (text) claims more bytes than follow
    with pytest.raises(DecodeError):
        pb.GenerateRequest.FromString(raw)
    got = malformed(pb.GenerateRequest, raw)
    assert got.field == "request" and "baton.v1.GenerateRequest" in got.reason


@settings(max_examples=400, deadline=None)
@given(good=st.builds(pb.GenerateRequest, text=st.text(max_size=40),
                      request_id=st.text(max_size=8)),
       noise=st.binary(max_size=64), cut=st.integers(0, 200))
def test_any_bytes_parse_or_get_a_named_field(good, noise, cut):
    raw = good.SerializeToString()
    raw = raw[:cut] + noise + raw[cut:]
    try:
        pb.GenerateRequest.FromString(raw)
    except DecodeError:
        got = malformed(pb.GenerateRequest, raw)
        assert got.field and got.reason  # never a crash, always a field to name
