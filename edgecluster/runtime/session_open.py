"""Opening a session from the coordinator: serving and training alike.

Rank 0 is the coordinator, rank i + 1 is `members[i]`. Each agent is asked to open
the session (OpenSession, in parallel, each with its deadline), with the fields
every session has (id, key salt, ranks' endpoints, names, emulated links) and those
of its kind (`fields_for`). The session key is derived on each side from the token,
never sent. Then the coordinator's links open. On any failure every agent is told
to close the session and the listener forgets it, so nothing is left half open;
the error is raised for the caller to re-plan.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

from edgecluster.comm.communicator import Communicator, SessionConfig
from edgecluster.net.auth import derive_session_key
from edgecluster.net.datachannel import DataListener
from edgecluster.net.pb import edgecluster_pb2 as pb
from edgecluster.net.pb import edgecluster_pb2_grpc as pb_grpc
from edgecluster.plan.cluster_file import LinkTable, link_matrix, session_links
from edgecluster.runtime.agent import reachable_host
from edgecluster.runtime.agent_calls import call_all, close_sessions
from edgecluster.types import MemberInfo


@dataclass(frozen=True, kw_only=True)
class SessionLinks:
    """How the coordinator reaches agents: its listener, host, token and link emulation."""

    listener: DataListener
    host: str
    token: str
    encrypt: bool = False  # TLS clusters seal data-channel frames
    link_delay_ms: float = 0.0
    link_table: LinkTable | None = None  # --cluster FILE: per-pair latency and bandwidth
    stub_for: Callable[[MemberInfo], pb_grpc.AgentStub] | None = None


def open_session(
    links: SessionLinks,
    session_id: str,
    members: Sequence[MemberInfo],
    stubs: Mapping[str, pb_grpc.AgentStub],
    *,
    fields_for: Callable[[int, MemberInfo], dict[str, Any]],
    deadline_for: Callable[[MemberInfo], float],
) -> Communicator:
    """The coordinator's communicator of a session every member has opened."""
    salt = secrets.token_bytes(16)
    key = derive_session_key(links.token, session_id, salt)  # never sent
    endpoints = [f"{m.address.rpartition(':')[0]}:{m.data_port}" for m in members]
    names = ["coordinator", *[m.name for m in members]]
    matrix = link_matrix(links.link_table, names) if links.link_table is not None else None
    links.listener.expect(session_id, key, links.link_delay_ms, links.encrypt)

    def open_on(rank: int, member: MemberInfo) -> pb.AgentStatus:
        hub = f"{reachable_host(links.host, member.address)}:{links.listener.port}"
        delays, bandwidths = session_links(matrix, rank)
        spec = pb.SessionSpec(
            session_id=session_id, key_salt=salt, encrypt_data=links.encrypt, rank=rank,
            endpoints=[hub, *endpoints], link_delay_ms=links.link_delay_ms,
            link_delays_ms=delays, link_bandwidths_mb_s=bandwidths, peer_names=names,
            **fields_for(rank, member),
        )  # fmt: skip
        return stubs[member.id].OpenSession(spec, timeout=deadline_for(member))

    calls: dict[str, Callable[[], pb.AgentStatus]] = {
        m.id: partial(open_on, rank, m) for rank, m in enumerate(members, 1)
    }
    try:
        call_all(calls, {m.id: m.name for m in members}, "OpenSession")
        delays, bandwidths = session_links(matrix, 0)
        config = SessionConfig(
            session_id=session_id, session_key=key, encrypt=links.encrypt, rank=0,
            endpoints=(f"{links.host}:{links.listener.port}", *endpoints),
            link_delay_ms=links.link_delay_ms, link_delays_ms=delays,
            link_bandwidths_mb_s=bandwidths,
        )  # fmt: skip
        return Communicator.connect(config, links.listener, names)
    except Exception:  # AgentCallsFailed, PeerLostError (a data link did not open), ...
        close_sessions(stubs, session_id)
        links.listener.forget(session_id)
        raise
