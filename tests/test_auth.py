"""The cluster token: constant-time comparison, the challenge-response handshake and the
per-call MACs, against a real loopback server (and a fake one that cannot prove the token)."""

from __future__ import annotations

import hmac
import re
import secrets
import time
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest

from edgecluster.net import auth
from edgecluster.net.auth import (
    AuthService,
    TokenAuthority,
    TokenServerInterceptor,
    call_mac,
    derive_session_key,
    generate_token,
    handshake_proof,
    session_proof,
    tokens_match,
)
from edgecluster.net.grpc_util import TokenClientInterceptor, open_channel, start_server
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
        [("authorization", f"Bearer {TOKEN}")],  # the token itself is no credential now
        [("x-edge-auth", "not.a.valid.proof")],
    ],
    ids=[
        "missing",
        "wrong",
        "empty",
        "no-scheme",
        "other-scheme",
        "other-header",
        "bearer",
        "garbage-proof",
    ],  # fmt: skip
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


# ---------------------------------------------------------------- the handshake


def test_session_keys_depend_on_token_session_and_salt() -> None:
    key = derive_session_key(TOKEN, "s1", b"salt" * 4)
    assert len(key) == 32 and key == derive_session_key(TOKEN, "s1", b"salt" * 4)
    assert key != derive_session_key("other", "s1", b"salt" * 4)
    assert key != derive_session_key(TOKEN, "s2", b"salt" * 4)
    assert key != derive_session_key(TOKEN, "s1", b"pepper" * 4)


class _Recorder(grpc.UnaryUnaryClientInterceptor):
    """Keeps the metadata of every call that passes (after the token interceptor)."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, str]] = []

    def intercept_unary_unary(self, continuation, details, request):  # type: ignore[no-untyped-def]
        self.sent.extend(details.metadata or ())
        return continuation(details, request)


def test_a_recorded_call_cannot_be_replayed(server_port: int) -> None:
    address = f"127.0.0.1:{server_port}"
    recorder = _Recorder()
    with grpc.insecure_channel(address) as raw:
        channel = grpc.intercept_channel(raw, TokenClientInterceptor(raw, TOKEN, address), recorder)
        _list_members(channel)
        _list_members(channel)  # the second call reuses the handshake
    (first, second) = [v for k, v in recorder.sent if k == "x-edge-auth"]
    assert first.split(".")[0] == second.split(".")[0]  # one handshake id, two nonces
    assert first.split(".")[1] != second.split(".")[1]
    assert TOKEN not in first and TOKEN not in second
    with grpc.insecure_channel(address) as raw:
        replaying = grpc.intercept_channel(raw, _StaticMetadata([("x-edge-auth", first)]))
        with pytest.raises(grpc.RpcError) as err:
            _list_members(replaying)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "replayed" in err.value.details()
        with pytest.raises(grpc.RpcError) as err:  # the same proof for another method
            pb_grpc.CoordinatorStub(replaying).Leave(pb.LeaveRequest(node_id="x"), timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


def _proven_by_hand(address: str) -> tuple[str, bytes, int]:
    """(handshake id, call key, server clock - ours in ms), from a handshake made by hand."""
    with grpc.insecure_channel(address) as raw:
        auth_stub = pb_grpc.AuthStub(raw)
        challenge = auth_stub.Challenge(pb.Empty(), timeout=5)
        hid, ns, nc = challenge.handshake_id, challenge.server_nonce, secrets.token_bytes(16)
        proof = handshake_proof(TOKEN, b"client", hid, ns, nc)
        reply = auth_stub.Prove(
            pb.AuthProveRequest(handshake_id=hid, client_nonce=nc, client_proof=proof), timeout=5
        )
    assert reply.server_proof == handshake_proof(TOKEN, b"server", hid, ns, nc)
    offset = challenge.server_time_ms - time.monotonic_ns() // 1_000_000
    return hid, handshake_proof(TOKEN, b"key", hid, ns, nc), offset


@pytest.mark.parametrize("age_s", [0.0, 60.0, -60.0], ids=["fresh", "stale", "future"])
def test_calls_stamped_outside_the_window_are_refused(server_port: int, age_s: float) -> None:
    address = f"127.0.0.1:{server_port}"
    hid, key, offset = _proven_by_hand(address)
    stamp = time.monotonic_ns() // 1_000_000 + offset - int(age_s * 1000)
    method = "/edgecluster.v1.Coordinator/ListMembers"
    nonce = secrets.token_hex(12)
    value = f"{hid}.{nonce}.{stamp}.{call_mac(key, method, hid, nonce, stamp)}"
    with grpc.insecure_channel(address) as raw:
        channel = grpc.intercept_channel(raw, _StaticMetadata([("x-edge-auth", value)]))
        if not age_s:
            assert list(_list_members(channel).agents) == []  # the hand-made proof is right
            return
        with pytest.raises(grpc.RpcError) as err:
            _list_members(channel)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "stale call time" in err.value.details()


def test_a_wrong_client_proof_is_refused_and_its_handshake_cannot_be_used(
    server_port: int,
) -> None:
    address = f"127.0.0.1:{server_port}"
    with grpc.insecure_channel(address) as raw:
        auth_stub = pb_grpc.AuthStub(raw)
        challenge = auth_stub.Challenge(pb.Empty(), timeout=5)
        hid, nc = challenge.handshake_id, secrets.token_bytes(16)
        with pytest.raises(grpc.RpcError) as err:
            auth_stub.Prove(
                pb.AuthProveRequest(
                    handshake_id=hid,
                    client_nonce=nc,
                    client_proof=handshake_proof(
                        "guess", b"client", hid, challenge.server_nonce, nc
                    ),
                ),
                timeout=5,
            )
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "authentication failed" in err.value.details() and "--token" in err.value.details()


def test_idle_handshakes_expire(monkeypatch: pytest.MonkeyPatch) -> None:
    authority = TokenAuthority(TOKEN)
    challenge = authority.challenge()
    hid, nc = challenge.handshake_id, secrets.token_bytes(16)
    proof = handshake_proof(TOKEN, b"client", hid, challenge.server_nonce, nc)
    assert authority.prove(
        pb.AuthProveRequest(handshake_id=hid, client_nonce=nc, client_proof=proof)
    )
    key = handshake_proof(TOKEN, b"key", hid, challenge.server_nonce, nc)
    method, stamp = "/m", time.monotonic_ns() // 1_000_000

    def call(nonce: str) -> Any:
        return authority.check_call(
            method, f"{hid}.{nonce}.{stamp}.{call_mac(key, method, hid, nonce, stamp)}"
        )

    assert call("n1") is None
    later = time.monotonic() + auth.HANDSHAKE_IDLE_S + 1
    monkeypatch.setattr(auth.time, "monotonic", lambda: later)
    authority.challenge()  # any later handshake sweeps the idle ones
    other = authority.challenge()
    nc2 = secrets.token_bytes(16)
    proof2 = handshake_proof(TOKEN, b"client", other.handshake_id, other.server_nonce, nc2)
    authority.prove(
        pb.AuthProveRequest(handshake_id=other.handshake_id, client_nonce=nc2, client_proof=proof2)
    )
    refusal = call("n2")
    assert refusal is not None and refusal[0] == grpc.StatusCode.UNAVAILABLE


class _FakeAuth(pb_grpc.AuthServicer):
    """A server that does not know the token: it answers the handshake with a made-up
    proof and records what it is sent."""

    def __init__(self) -> None:
        self.received: list[bytes] = []

    def Challenge(self, request: pb.Empty, context: grpc.ServicerContext) -> pb.AuthChallengeReply:
        return pb.AuthChallengeReply(handshake_id="h", server_nonce=b"n" * 16, server_time_ms=0)

    def Prove(self, request: pb.AuthProveRequest, context: grpc.ServicerContext) -> Any:
        self.received.append(request.SerializeToString())
        return pb.AuthProveReply(server_proof=secrets.token_bytes(32))


def test_a_server_that_cannot_prove_the_token_is_refused_by_the_client() -> None:
    fake = _FakeAuth()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    pb_grpc.add_AuthServicer_to_server(fake, server)
    pb_grpc.add_CoordinatorServicer_to_server(CoordinatorService(Membership()), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with (
            open_channel(f"127.0.0.1:{port}", TOKEN) as channel,
            pytest.raises(grpc.RpcError) as err,
        ):
            _list_members(channel)  # the real servicer is there, unprotected: never reached
    finally:
        server.stop(grace=None)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "could not prove the cluster token" in err.value.details()
    assert len(fake.received) == 1 and TOKEN.encode() not in fake.received[0]


def test_the_auth_service_is_the_only_one_served_without_proof(server_port: int) -> None:
    assert isinstance(AuthService(TokenAuthority(TOKEN)), pb_grpc.AuthServicer)
    with grpc.insecure_channel(f"127.0.0.1:{server_port}") as raw:
        reply = pb_grpc.AuthStub(raw).Challenge(pb.Empty(), timeout=5)
    assert len(reply.server_nonce) == 16 and reply.handshake_id


def test_a_restarted_server_costs_one_failed_call_then_the_channel_proves_again() -> None:
    def serve(port: int) -> tuple[grpc.Server, int]:
        return start_server(
            host="127.0.0.1",
            port=port,
            token=TOKEN,
            register=[
                lambda s: pb_grpc.add_CoordinatorServicer_to_server(
                    CoordinatorService(Membership()), s
                )
            ],
            max_workers=2,
        )

    server, port = serve(0)
    with open_channel(f"127.0.0.1:{port}", TOKEN) as channel:
        _list_members(channel)
        server.stop(grace=None)
        server, _ = serve(port)  # a new process: it knows no handshake
        try:
            with pytest.raises(grpc.RpcError) as err:
                _list_members(channel)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE  # retryable, not "refused"
            assert "handshake unknown or expired" in err.value.details()
            assert list(_list_members(channel).agents) == []  # proven again
        finally:
            server.stop(grace=None)


def test_a_server_without_the_auth_service_is_named_as_too_old() -> None:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    pb_grpc.add_CoordinatorServicer_to_server(CoordinatorService(Membership()), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with (
            open_channel(f"127.0.0.1:{port}", TOKEN) as channel,
            pytest.raises(grpc.RpcError) as err,
        ):
            _list_members(channel)
    finally:
        server.stop(grace=None)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "no Auth service" in err.value.details()
