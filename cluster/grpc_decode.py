"""Requests that protobuf cannot parse end as INVALID_ARGUMENT naming the field.

grpcio answers UNKNOWN ("Unexpected DecodeError") when a request
deserializer raises, as protobuf does for a string field holding invalid
UTF-8. ``MalformedRequests`` is a server interceptor that gives every method
of the services it is told about a deserializer that never raises: a message
that does not parse becomes a ``Malformed`` value, and the method answers it
with INVALID_ARGUMENT after the usual authentication check, without running.

Naming the field: the bytes are parsed again into a mirror of the message in
which every string field is declared ``bytes`` (built once per message type
from its descriptor), and the first string that is not UTF-8 is named by its
path, e.g. ``text`` or ``chat.messages[1].content``.

Lifecycle: build one ``MalformedRequests(services, check_auth)`` and pass it
to ``grpc.aio.server(interceptors=...)``; it is stateless after that.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, message, message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor


@dataclass(frozen=True)
class Malformed:
    """A request that did not parse: the field to blame and why."""
    field: str
    reason: str


def malformed(cls: type[message.Message], raw: bytes) -> Malformed:
    """Why ``raw`` is not a valid ``cls`` (call after ``cls.FromString`` failed)."""
    try:
        mirror = _mirror(cls).FromString(raw)
    except message.DecodeError:
        return Malformed("request", f"not a valid {cls.DESCRIPTOR.full_name} message")
    bad = _first_bad_utf8(mirror, cls.DESCRIPTOR, "")
    if bad is None:  # a parse failure the mirror does not share
        return Malformed("request", f"not a valid {cls.DESCRIPTOR.full_name} message")
    return Malformed(bad, "not valid UTF-8")


@functools.cache
def _mirror(cls: type[message.Message]) -> type[message.Message]:
    """``cls`` with every string field (nested messages included) as bytes."""
    pool = descriptor_pool.DescriptorPool()
    _add_file(pool, cls.DESCRIPTOR.file, as_bytes=True)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName(cls.DESCRIPTOR.full_name))


def _add_file(pool: descriptor_pool.DescriptorPool, file, as_bytes: bool) -> None:
    for dep in file.dependencies:
        try:
            pool.FindFileByName(dep.name)
        except KeyError:
            _add_file(pool, dep, as_bytes=False)
    proto = descriptor_pb2.FileDescriptorProto()
    file.CopyToProto(proto)
    if as_bytes:
        for msg in proto.message_type:
            _strings_to_bytes(msg)
    pool.Add(proto)


def _strings_to_bytes(msg: descriptor_pb2.DescriptorProto) -> None:
    # A map's key cannot be bytes: in the mirror a map is what it is on the
    # wire, a repeated message of (key, value) entries.
    msg.options.ClearField("map_entry")
    for f in msg.field:
        if f.type == descriptor_pb2.FieldDescriptorProto.TYPE_STRING:
            f.type = descriptor_pb2.FieldDescriptorProto.TYPE_BYTES
    for nested in msg.nested_type:
        _strings_to_bytes(nested)


def _first_bad_utf8(msg: message.Message, desc: Descriptor, prefix: str) -> str | None:
    for mirror_field, value in msg.ListFields():
        field = desc.fields_by_name[mirror_field.name]
        path = f"{prefix}{field.name}"
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            bad = _bad_in_map(value, field.message_type, path)
        elif field.is_repeated:
            bad = next((b for i, v in enumerate(value)
                        if (b := _bad_in_value(v, field, f"{path}[{i}]")) is not None), None)
        else:
            bad = _bad_in_value(value, field, path)
        if bad is not None:
            return bad
    return None


def _bad_in_map(entries, entry: Descriptor, path: str) -> str | None:
    key_f, value_f = entry.fields_by_name["key"], entry.fields_by_name["value"]
    for e in entries:
        if _bad_in_value(e.key, key_f, path) is not None:
            return path
        shown = e.key.decode() if isinstance(e.key, bytes) else e.key
        if (bad := _bad_in_value(e.value, value_f, f"{path}[{shown!r}]")) is not None:
            return bad
    return None


def _bad_in_value(value, field: FieldDescriptor, path: str) -> str | None:
    if field.type == FieldDescriptor.TYPE_STRING:
        try:
            value.decode("utf-8")
        except UnicodeDecodeError:
            return path
        return None
    if field.message_type is not None:
        return _first_bad_utf8(value, field.message_type, f"{path}.")
    return None


def _message_class(deserialize) -> type[message.Message] | None:
    """The class whose generated ``FromString`` this is, else None."""
    cls = getattr(deserialize, "__self__", None)
    return cls if isinstance(cls, type) and issubclass(cls, message.Message) else None


def _tolerant(deserialize: Callable[[bytes], message.Message],
              cls: type[message.Message]) -> Callable[[bytes], object]:
    def parse(raw: bytes):
        try:
            return deserialize(raw)
        except message.DecodeError:
            return malformed(cls, raw)
    return parse


class MalformedRequests(grpc.aio.ServerInterceptor):
    """Every method of ``services``: a request that does not parse is answered
    INVALID_ARGUMENT naming the field, after ``check_auth(context)``."""

    def __init__(self, services: tuple[str, ...],
                 check_auth: Callable[[grpc.aio.ServicerContext], Awaitable[None]]):
        self.prefixes = tuple(f"/{s}/" for s in services)
        self.check_auth = check_auth

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or not details.method.startswith(self.prefixes):
            return handler
        cls = _message_class(handler.request_deserializer)
        if handler.request_streaming or cls is None:
            return handler  # every Baton method takes one generated message
        kind = "unary_stream" if handler.response_streaming else "unary_unary"
        return handler._replace(request_deserializer=_tolerant(handler.request_deserializer, cls),
                                **{kind: self._guard(getattr(handler, kind))})

    def _guard(self, behavior):
        async def refuse(request: Malformed, context) -> None:
            await self.check_auth(context)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"{request.field}: {request.reason}")

        if inspect.isasyncgenfunction(behavior):
            async def stream(request, context):
                if isinstance(request, Malformed):
                    await refuse(request, context)
                async for response in behavior(request, context):
                    yield response
            return stream

        async def unary(request, context):
            if isinstance(request, Malformed):
                await refuse(request, context)
            return await behavior(request, context)
        return unary
