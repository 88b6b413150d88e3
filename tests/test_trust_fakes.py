"""Fake peers learn nothing usable: the cluster token never crosses the network.

A fake mDNS responder (python-zeroconf on 127.0.0.1) advertises a fake coordinator: a
real gRPC server that answers the handshake with a made-up proof and records every
method, metadata entry and request byte it is sent. A real `edge-agent join` (mDNS on)
finds it, refuses it (it cannot prove the token), keeps looking and joins the real
coordinator once one appears. Likewise a fake agent invited by a real coordinator
(`--peers`) is sent nothing but the handshake. Neither recording holds the token in
any encoding.
"""

from __future__ import annotations

import base64
import socket
import threading
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field

import grpc
import pytest
from zeroconf import IPVersion, ServiceInfo, Zeroconf

from edgecluster import PROTOCOL_VERSION
from edgecluster.net.discovery import SERVICE_TYPE
from edgecluster.net.pb import edgecluster_pb2 as pb
from tests.procs import ProcessPool, procs, unique_name, wait_until  # noqa: F401

TOKEN = "fakes-test-" + base64.urlsafe_b64encode(b"\x07" * 18).decode()
AUTH = "/edgecluster.v1.Auth/"


def token_forms(token: str) -> list[bytes]:
    """The token as any peer could write it: raw, hex, base64 (either alphabet, padded
    or not), and the bytes its URL-safe text decodes to."""
    raw = token.encode()
    forms = [raw, raw.hex().encode(), base64.b64encode(raw), base64.urlsafe_b64encode(raw)]
    forms += [f.rstrip(b"=") for f in forms[2:]]
    tail = token.rsplit("-", 1)[-1]
    decoded = base64.urlsafe_b64decode(tail + "=" * (-len(tail) % 4))
    forms += [decoded, decoded.hex().encode()]
    return forms


@dataclass
class Recording:
    calls: list[tuple[str, list[tuple[str, str | bytes]], bytes]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def methods(self) -> list[str]:
        with self.lock:
            return [method for method, _, _ in self.calls]

    def everything(self) -> bytes:
        with self.lock:
            out = b""
            for method, metadata, body in self.calls:
                out += method.encode() + body
                for key, value in metadata:
                    out += key.encode() + (value if isinstance(value, bytes) else value.encode())
            return out


class _RecordEverything(grpc.GenericRpcHandler):
    """Serves every method as unary with raw bytes: the handshake gets plausible answers
    (a challenge, then a made-up proof), anything else an empty reply."""

    def __init__(self, recording: Recording) -> None:
        self._recording = recording

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        method = details.method

        def answer(request: bytes, context: grpc.ServicerContext) -> bytes:
            with self._recording.lock:
                metadata = [(m.key, m.value) for m in context.invocation_metadata()]
                self._recording.calls.append((method, metadata, request))
            if method == AUTH + "Challenge":
                reply = pb.AuthChallengeReply(handshake_id="fake", server_nonce=b"\x01" * 16)
                return reply.SerializeToString()
            if method == AUTH + "Prove":
                return pb.AuthProveReply(server_proof=b"\x02" * 32).SerializeToString()
            return b""

        return grpc.unary_unary_rpc_method_handler(answer)  # raw bytes in and out


@pytest.fixture
def fake_server() -> Iterator[tuple[int, Recording]]:
    recording = Recording()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers((_RecordEverything(recording),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield port, recording
    server.stop(grace=None)


@pytest.fixture
def fake_advertisement(fake_server: tuple[int, Recording]) -> Iterator[None]:
    """A fake mDNS responder on loopback announcing the fake server as a coordinator."""
    port, _ = fake_server
    zc = Zeroconf(interfaces=["127.0.0.1"], ip_version=IPVersion.V4Only)
    info = ServiceInfo(
        SERVICE_TYPE,
        f"fake-coordinator.{SERVICE_TYPE}",
        addresses=[socket.inet_aton("127.0.0.1")],
        port=port,
        properties={
            "role": "coordinator",
            "name": "coordinator",
            "node_id": "f" * 32,
            "grpc_port": str(port),
            "protocol_version": str(PROTOCOL_VERSION),
        },  # fmt: skip
        server="fake-coordinator.local.",
    )
    zc.register_service(info)
    yield
    zc.unregister_service(info)
    zc.close()


def _assert_nothing_usable(recording: Recording) -> None:
    seen = recording.everything()
    assert seen, "the fake peer was never contacted"
    for form in token_forms(TOKEN):
        assert form not in seen, f"the token travelled (as {form!r})"
    assert set(recording.methods()) <= {AUTH + "Challenge", AUTH + "Prove"}, recording.methods()


def test_an_agent_refuses_a_fake_coordinator_and_finds_the_real_one(
    procs: ProcessPool,  # noqa: F811
    fake_server: tuple[int, Recording],
    fake_advertisement: None,
) -> None:
    port, recording = fake_server
    name = unique_name("lured")
    agent = procs.agent(None, name=name, token=TOKEN, mdns=True)
    wait_until(lambda: "could not prove" in agent.stderr(), 30, "the agent to refuse the fake")
    assert agent.running(), agent.describe()
    _assert_nothing_usable(recording)
    assert f"127.0.0.1:{port}" in agent.stderr() and "looking for another" in agent.stderr()

    coord = procs.coordinator(mdns=True, token=TOKEN)  # the real one appears: joined
    coord.wait_member(name, "alive", timeout_s=30)
    _assert_nothing_usable(recording)


def test_a_fake_agent_invited_by_the_coordinator_learns_nothing(
    procs: ProcessPool,  # noqa: F811
    fake_server: tuple[int, Recording],
) -> None:
    port, recording = fake_server
    coord = procs.coordinator("--peers", f"127.0.0.1:{port}", token=TOKEN)
    wait_until(lambda: AUTH + "Prove" in recording.methods(), 30, "an invitation attempt")
    wait_until(lambda: recording.methods().count(AUTH + "Prove") >= 2, 30, "a second attempt")
    assert coord.running()
    _assert_nothing_usable(recording)  # no Invite (nor anything else) reached it
