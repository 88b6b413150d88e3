"""The Coordinator gRPC service: join, heartbeat, leave, list members."""

from __future__ import annotations

import logging

import grpc

from edgecluster import PROTOCOL_VERSION
from edgecluster.net.convert import member_to_pb, profile_from_pb, runtime_from_pb
from edgecluster.net.pb import edgecluster_pb2 as pb
from edgecluster.net.pb import edgecluster_pb2_grpc as pb_grpc
from edgecluster.runtime.membership import Membership
from edgecluster.types import MemberInfo, NodeId

log = logging.getLogger(__name__)


class CoordinatorService(pb_grpc.CoordinatorServicer):
    def __init__(self, membership: Membership, heartbeat_interval_s: float = 0.5) -> None:
        self._membership = membership
        self._heartbeat_interval_s = heartbeat_interval_s

    def Join(self, request: pb.JoinRequest, context: grpc.ServicerContext) -> pb.JoinReply:
        if request.protocol_version != PROTOCOL_VERSION:
            context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"protocol version mismatch: agent speaks {request.protocol_version}, "
                f"coordinator speaks {PROTOCOL_VERSION}; install the same edgecluster "
                "version on both",
            )
        if not request.node_id or not request.name or ":" not in request.address:
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "join needs node_id, name and address host:port"
            )
        try:
            profile = profile_from_pb(request.profile)
        except ValueError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"bad device profile: {exc}")
        self._membership.join(
            MemberInfo(
                id=NodeId(request.node_id),
                name=request.name,
                address=request.address,
                data_port=request.data_port,
                state="alive",
                profile=profile,
            )
        )
        return pb.JoinReply(
            node_id=request.node_id, heartbeat_interval_s=self._heartbeat_interval_s
        )

    def Heartbeat(
        self, request: pb.HeartbeatRequest, context: grpc.ServicerContext
    ) -> pb.HeartbeatReply:
        runtime = runtime_from_pb(request.status) if request.HasField("status") else None
        known = self._membership.heartbeat(
            NodeId(request.node_id), request.memory_available_bytes or None, runtime
        )
        return pb.HeartbeatReply(known=known)

    def Leave(self, request: pb.LeaveRequest, context: grpc.ServicerContext) -> pb.Empty:
        self._membership.leave(NodeId(request.node_id))
        return pb.Empty()

    def ListMembers(self, request: pb.Empty, context: grpc.ServicerContext) -> pb.Members:
        return pb.Members(agents=[member_to_pb(m) for m in self._membership.snapshot()])
