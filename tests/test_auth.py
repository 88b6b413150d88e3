"""The cluster token: constant-time comparison, and interceptors on a real loopback server."""

from __future__ import annotations

import hmac
import re
from collections.abc import Iterator

import grpc
import pytest

from edgecluster.net import auth
from edgecluster.net.auth import (
    TokenServerInterceptor,
    generate_token,
    session_proof,
    tokens_match,
)
from edgecluster.net.grpc_util import open_channel, start_server
from edgecluster.net.pb import edgecluster_pb2 as pb
from edgecluster.net.pb import edgecluster_pb2_grpc as pb_grpc
from edgecluster.runtime.coordinator_service import CoordinatorService
from edgecluster.runtime.membership import Membership

TOKEN = "s3cret-token"


def test_tokens_match_only_the_same_token() -> None:
    assert tokens_match(TOKEN, TOKEN)
    assert not tokens_match("", TOKEN)
    assert not tokens_match(TOKEN + "x", TOKEN)
    assert not tokens_match(TOKEN[:-1], TOKEN)
    assert not tokens_match(TOKEN.upper(), TOKEN)
    assert tokens_match("jeton-été-🔑", "jeton-été-🔑")  # not ASCII: still compared, no TypeError
    assert not tokens_match("jeton-été-🔑", "jeton-ete-🔑")


def test_tokens_are_compared_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    # The comparison must go through hmac.compare_digest (no early exit on the first
    # differing byte); a plain == would leak the token's prefix through timing.
    seen: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        seen.append((a, b))
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", spy)
    assert not tokens_match("abc", TOKEN)
    assert seen == [(b"abc", TOKEN.encode())]


def test_generated_tokens_are_long_distinct_and_safe_on_a_command_line() -> None:
    tokens = {generate_token() for _ in range(400)}
    assert len(tokens) == 400
    assert all(re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_-]{31,}", t) for t in tokens)
    # A leading '-' (1 in 64 of token_urlsafe's) makes `--token -abc` fail to parse.
    assert not any(t.startswith("-") for t in tokens)


def test_session_proof_depends_on_key_and_every_part() -> None:
    base = session_proof(b"k" * 32, b"nonce", b"sess", b"1")
    assert len(base) == 32
    assert base == session_proof(b"k" * 32, b"nonce", b"sess", b"1")
    assert base != session_proof(b"j" * 32, b"nonce", b"sess", b"1")
    assert base != session_proof(b"k" * 32, b"nonce", b"sess", b"2")
    assert base != session_proof(b"k" * 32, b"nonc", b"esess", b"1")


def test_a_server_needs_a_token() -> None:
    with pytest.raises(ValueError, match="token is required"):
        TokenServerInterceptor("")


@pytest.fixture(scope="module")
def server_port() -> Iterator[int]:
    """A real token-checking gRPC server on 127.0.0.1 with the Coordinator service and
    an unimplemented Agent service (its stream-unary PutShard exercises the stream path)."""
    server, port = start_server(
        host="127.0.0.1",
        port=0,
        token=TOKEN,
        register=[
            lambda s: pb_grpc.add_CoordinatorServicer_to_server(
                CoordinatorService(Membership()), s
            ),
            lambda s: pb_grpc.add_AgentServicer_to_server(pb_grpc.AgentServicer(), s),
        ],
        max_workers=4,
    )
    yield port
    server.stop(grace=None)


def _list_members(channel: grpc.Channel) -> pb.Members:
    return pb_grpc.CoordinatorStub(channel).ListMembers(pb.Empty(), timeout=5)


def _put_shard(channel: grpc.Channel) -> pb.PutShardReply:
    return pb_grpc.AgentStub(channel).PutShard(iter([pb.ShardChunk(shard_key="k")]), timeout=5)


def test_the_right_token_is_let_through(server_port: int) -> None:
    with open_channel(f"127.0.0.1:{server_port}", TOKEN) as channel:
        assert list(_list_members(channel).agents) == []
        with pytest.raises(grpc.RpcError) as err:  # past the interceptor: the servicer answers
            _put_shard(channel)
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED


@pytest.mark.parametrize("call", [_list_members, _put_shard], ids=["unary", "stream"])
@pytest.mark.parametrize(
    "metadata",
    [
        None,
        [("authorization", "Bearer wrong")],
        [("authorization", "Bearer ")],
        [("authorization", TOKEN)],  # the token without the scheme
        [("authorization", f"Basic {TOKEN}")],
        [("x-token", TOKEN)],
    ],
    ids=["missing", "wrong", "empty", "no-scheme", "other-scheme", "other-header"],
)
def test_calls_without_the_token_are_unauthenticated(server_port: int, call, metadata) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{server_port}") as raw:
        channel = raw
        if metadata is not None:
            channel = grpc.intercept_channel(raw, _StaticMetadata(metadata))
        with pytest.raises(grpc.RpcError) as err:
            call(channel)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "authentication failed" in err.value.details()
    assert "--token" in err.value.details()


def test_a_client_with_another_token_is_refused(server_port: int) -> None:
    with (
        open_channel(f"127.0.0.1:{server_port}", "not-" + TOKEN) as channel,
        pytest.raises(grpc.RpcError) as err,
    ):
        _list_members(channel)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


class _StaticMetadata(grpc.UnaryUnaryClientInterceptor, grpc.StreamUnaryClientInterceptor):
    """Sends fixed metadata, bypassing TokenClientInterceptor, to forge bad credentials."""

    def __init__(self, metadata: list[tuple[str, str]]) -> None:
        self._metadata = metadata

    def _details(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        return _Details(details, self._metadata)

    def intercept_unary_unary(self, continuation, details, request):  # type: ignore[no-untyped-def]
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation, details, request_iter):  # type: ignore[no-untyped-def]
        return continuation(self._details(details), request_iter)


class _Details(grpc.ClientCallDetails):
    def __init__(self, base: grpc.ClientCallDetails, metadata: list[tuple[str, str]]) -> None:
        self.method = base.method
        self.timeout = base.timeout
        self.metadata = metadata
        self.credentials = base.credentials
        self.wait_for_ready = getattr(base, "wait_for_ready", None)
        self.compression = getattr(base, "compression", None)
