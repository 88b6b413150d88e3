from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Empty(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class TensorChunk(_message.Message):
    __slots__ = ("name", "dtype", "shape", "offset", "data")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    offset: int
    data: bytes
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class DeviceProfile(_message.Message):
    __slots__ = ("cpu_count", "memory_total_bytes", "memory_available_bytes", "disk_free_bytes", "disk_read_bytes_per_s", "matmul_gflops", "accelerator", "memory_limit_bytes", "runtime_rss_bytes", "cpu_limit")
    CPU_COUNT_FIELD_NUMBER: _ClassVar[int]
    MEMORY_TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_AVAILABLE_BYTES_FIELD_NUMBER: _ClassVar[int]
    DISK_FREE_BYTES_FIELD_NUMBER: _ClassVar[int]
    DISK_READ_BYTES_PER_S_FIELD_NUMBER: _ClassVar[int]
    MATMUL_GFLOPS_FIELD_NUMBER: _ClassVar[int]
    ACCELERATOR_FIELD_NUMBER: _ClassVar[int]
    MEMORY_LIMIT_BYTES_FIELD_NUMBER: _ClassVar[int]
    RUNTIME_RSS_BYTES_FIELD_NUMBER: _ClassVar[int]
    CPU_LIMIT_FIELD_NUMBER: _ClassVar[int]
    cpu_count: int
    memory_total_bytes: int
    memory_available_bytes: int
    disk_free_bytes: int
    disk_read_bytes_per_s: float
    matmul_gflops: float
    accelerator: str
    memory_limit_bytes: int
    runtime_rss_bytes: int
    cpu_limit: float
    def __init__(self, cpu_count: _Optional[int] = ..., memory_total_bytes: _Optional[int] = ..., memory_available_bytes: _Optional[int] = ..., disk_free_bytes: _Optional[int] = ..., disk_read_bytes_per_s: _Optional[float] = ..., matmul_gflops: _Optional[float] = ..., accelerator: _Optional[str] = ..., memory_limit_bytes: _Optional[int] = ..., runtime_rss_bytes: _Optional[int] = ..., cpu_limit: _Optional[float] = ...) -> None: ...

class JoinRequest(_message.Message):
    __slots__ = ("protocol_version", "node_id", "name", "address", "profile", "data_port")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    PROFILE_FIELD_NUMBER: _ClassVar[int]
    DATA_PORT_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    node_id: str
    name: str
    address: str
    profile: DeviceProfile
    data_port: int
    def __init__(self, protocol_version: _Optional[int] = ..., node_id: _Optional[str] = ..., name: _Optional[str] = ..., address: _Optional[str] = ..., profile: _Optional[_Union[DeviceProfile, _Mapping]] = ..., data_port: _Optional[int] = ...) -> None: ...

class JoinReply(_message.Message):
    __slots__ = ("node_id", "heartbeat_interval_s")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_S_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    heartbeat_interval_s: float
    def __init__(self, node_id: _Optional[str] = ..., heartbeat_interval_s: _Optional[float] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("node_id", "memory_available_bytes", "status")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    MEMORY_AVAILABLE_BYTES_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    memory_available_bytes: int
    status: AgentStatus
    def __init__(self, node_id: _Optional[str] = ..., memory_available_bytes: _Optional[int] = ..., status: _Optional[_Union[AgentStatus, _Mapping]] = ...) -> None: ...

class HeartbeatReply(_message.Message):
    __slots__ = ("known",)
    KNOWN_FIELD_NUMBER: _ClassVar[int]
    known: bool
    def __init__(self, known: _Optional[bool] = ...) -> None: ...

class LeaveRequest(_message.Message):
    __slots__ = ("node_id",)
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    def __init__(self, node_id: _Optional[str] = ...) -> None: ...

class Member(_message.Message):
    __slots__ = ("id", "name", "address", "state", "profile", "last_seen_s_ago", "runtime")
    ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    PROFILE_FIELD_NUMBER: _ClassVar[int]
    LAST_SEEN_S_AGO_FIELD_NUMBER: _ClassVar[int]
    RUNTIME_FIELD_NUMBER: _ClassVar[int]
    id: str
    name: str
    address: str
    state: str
    profile: DeviceProfile
    last_seen_s_ago: float
    runtime: AgentStatus
    def __init__(self, id: _Optional[str] = ..., name: _Optional[str] = ..., address: _Optional[str] = ..., state: _Optional[str] = ..., profile: _Optional[_Union[DeviceProfile, _Mapping]] = ..., last_seen_s_ago: _Optional[float] = ..., runtime: _Optional[_Union[AgentStatus, _Mapping]] = ...) -> None: ...

class Members(_message.Message):
    __slots__ = ("agents",)
    AGENTS_FIELD_NUMBER: _ClassVar[int]
    agents: _containers.RepeatedCompositeFieldContainer[Member]
    def __init__(self, agents: _Optional[_Iterable[_Union[Member, _Mapping]]] = ...) -> None: ...

class AuthChallengeReply(_message.Message):
    __slots__ = ("handshake_id", "server_nonce", "server_time_ms")
    HANDSHAKE_ID_FIELD_NUMBER: _ClassVar[int]
    SERVER_NONCE_FIELD_NUMBER: _ClassVar[int]
    SERVER_TIME_MS_FIELD_NUMBER: _ClassVar[int]
    handshake_id: str
    server_nonce: bytes
    server_time_ms: int
    def __init__(self, handshake_id: _Optional[str] = ..., server_nonce: _Optional[bytes] = ..., server_time_ms: _Optional[int] = ...) -> None: ...

class AuthProveRequest(_message.Message):
    __slots__ = ("handshake_id", "client_nonce", "client_proof")
    HANDSHAKE_ID_FIELD_NUMBER: _ClassVar[int]
    CLIENT_NONCE_FIELD_NUMBER: _ClassVar[int]
    CLIENT_PROOF_FIELD_NUMBER: _ClassVar[int]
    handshake_id: str
    client_nonce: bytes
    client_proof: bytes
    def __init__(self, handshake_id: _Optional[str] = ..., client_nonce: _Optional[bytes] = ..., client_proof: _Optional[bytes] = ...) -> None: ...

class AuthProveReply(_message.Message):
    __slots__ = ("server_proof",)
    SERVER_PROOF_FIELD_NUMBER: _ClassVar[int]
    server_proof: bytes
    def __init__(self, server_proof: _Optional[bytes] = ...) -> None: ...

class InviteRequest(_message.Message):
    __slots__ = ("coordinator_address",)
    COORDINATOR_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    coordinator_address: str
    def __init__(self, coordinator_address: _Optional[str] = ...) -> None: ...

class ShardSpec(_message.Message):
    __slots__ = ("q_head_start", "q_head_end", "kv_head_start", "kv_head_end", "mlp_col_start", "mlp_col_end", "holds_output_bias")
    Q_HEAD_START_FIELD_NUMBER: _ClassVar[int]
    Q_HEAD_END_FIELD_NUMBER: _ClassVar[int]
    KV_HEAD_START_FIELD_NUMBER: _ClassVar[int]
    KV_HEAD_END_FIELD_NUMBER: _ClassVar[int]
    MLP_COL_START_FIELD_NUMBER: _ClassVar[int]
    MLP_COL_END_FIELD_NUMBER: _ClassVar[int]
    HOLDS_OUTPUT_BIAS_FIELD_NUMBER: _ClassVar[int]
    q_head_start: int
    q_head_end: int
    kv_head_start: int
    kv_head_end: int
    mlp_col_start: int
    mlp_col_end: int
    holds_output_bias: bool
    def __init__(self, q_head_start: _Optional[int] = ..., q_head_end: _Optional[int] = ..., kv_head_start: _Optional[int] = ..., kv_head_end: _Optional[int] = ..., mlp_col_start: _Optional[int] = ..., mlp_col_end: _Optional[int] = ..., holds_output_bias: _Optional[bool] = ...) -> None: ...

class PrepareShardRequest(_message.Message):
    __slots__ = ("shard_key", "model_config_json", "spec", "blocks", "storage_dtype", "weights")
    SHARD_KEY_FIELD_NUMBER: _ClassVar[int]
    MODEL_CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    STORAGE_DTYPE_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    shard_key: str
    model_config_json: str
    spec: ShardSpec
    blocks: _containers.RepeatedScalarFieldContainer[str]
    storage_dtype: str
    weights: str
    def __init__(self, shard_key: _Optional[str] = ..., model_config_json: _Optional[str] = ..., spec: _Optional[_Union[ShardSpec, _Mapping]] = ..., blocks: _Optional[_Iterable[str]] = ..., storage_dtype: _Optional[str] = ..., weights: _Optional[str] = ...) -> None: ...

class PrepareShardReply(_message.Message):
    __slots__ = ("missing_blocks",)
    MISSING_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    missing_blocks: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, missing_blocks: _Optional[_Iterable[str]] = ...) -> None: ...

class ShardChunk(_message.Message):
    __slots__ = ("shard_key", "block", "chunk", "block_end", "block_sha256")
    SHARD_KEY_FIELD_NUMBER: _ClassVar[int]
    BLOCK_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    BLOCK_END_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SHA256_FIELD_NUMBER: _ClassVar[int]
    shard_key: str
    block: str
    chunk: TensorChunk
    block_end: bool
    block_sha256: str
    def __init__(self, shard_key: _Optional[str] = ..., block: _Optional[str] = ..., chunk: _Optional[_Union[TensorChunk, _Mapping]] = ..., block_end: _Optional[bool] = ..., block_sha256: _Optional[str] = ...) -> None: ...

class PutShardReply(_message.Message):
    __slots__ = ("bytes_received", "blocks_stored")
    BYTES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_STORED_FIELD_NUMBER: _ClassVar[int]
    bytes_received: int
    blocks_stored: int
    def __init__(self, bytes_received: _Optional[int] = ..., blocks_stored: _Optional[int] = ...) -> None: ...

class SessionSpec(_message.Message):
    __slots__ = ("session_id", "key_salt", "rank", "endpoints", "algorithm", "shard_key", "compute_dtype", "window_blocks", "max_context", "link_delay_ms", "kv_dtype", "kv_budget_tokens", "encrypt_data", "peer_names", "link_delays_ms", "link_bandwidths_mb_s", "kind", "training_json")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    KEY_SALT_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    ENDPOINTS_FIELD_NUMBER: _ClassVar[int]
    ALGORITHM_FIELD_NUMBER: _ClassVar[int]
    SHARD_KEY_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_DTYPE_FIELD_NUMBER: _ClassVar[int]
    WINDOW_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    MAX_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    LINK_DELAY_MS_FIELD_NUMBER: _ClassVar[int]
    KV_DTYPE_FIELD_NUMBER: _ClassVar[int]
    KV_BUDGET_TOKENS_FIELD_NUMBER: _ClassVar[int]
    ENCRYPT_DATA_FIELD_NUMBER: _ClassVar[int]
    PEER_NAMES_FIELD_NUMBER: _ClassVar[int]
    LINK_DELAYS_MS_FIELD_NUMBER: _ClassVar[int]
    LINK_BANDWIDTHS_MB_S_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    TRAINING_JSON_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    key_salt: bytes
    rank: int
    endpoints: _containers.RepeatedScalarFieldContainer[str]
    algorithm: str
    shard_key: str
    compute_dtype: str
    window_blocks: int
    max_context: int
    link_delay_ms: float
    kv_dtype: str
    kv_budget_tokens: int
    encrypt_data: bool
    peer_names: _containers.RepeatedScalarFieldContainer[str]
    link_delays_ms: _containers.RepeatedScalarFieldContainer[float]
    link_bandwidths_mb_s: _containers.RepeatedScalarFieldContainer[float]
    kind: str
    training_json: str
    def __init__(self, session_id: _Optional[str] = ..., key_salt: _Optional[bytes] = ..., rank: _Optional[int] = ..., endpoints: _Optional[_Iterable[str]] = ..., algorithm: _Optional[str] = ..., shard_key: _Optional[str] = ..., compute_dtype: _Optional[str] = ..., window_blocks: _Optional[int] = ..., max_context: _Optional[int] = ..., link_delay_ms: _Optional[float] = ..., kv_dtype: _Optional[str] = ..., kv_budget_tokens: _Optional[int] = ..., encrypt_data: _Optional[bool] = ..., peer_names: _Optional[_Iterable[str]] = ..., link_delays_ms: _Optional[_Iterable[float]] = ..., link_bandwidths_mb_s: _Optional[_Iterable[float]] = ..., kind: _Optional[str] = ..., training_json: _Optional[str] = ...) -> None: ...

class AgentStatus(_message.Message):
    __slots__ = ("node_id", "session_id", "streaming", "window_blocks", "read_bytes_per_s", "weight_bytes", "resident_weight_bytes", "peak_rss_bytes", "rss_bytes")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    STREAMING_FIELD_NUMBER: _ClassVar[int]
    WINDOW_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    READ_BYTES_PER_S_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_BYTES_FIELD_NUMBER: _ClassVar[int]
    RESIDENT_WEIGHT_BYTES_FIELD_NUMBER: _ClassVar[int]
    PEAK_RSS_BYTES_FIELD_NUMBER: _ClassVar[int]
    RSS_BYTES_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    session_id: str
    streaming: bool
    window_blocks: int
    read_bytes_per_s: float
    weight_bytes: int
    resident_weight_bytes: int
    peak_rss_bytes: int
    rss_bytes: int
    def __init__(self, node_id: _Optional[str] = ..., session_id: _Optional[str] = ..., streaming: _Optional[bool] = ..., window_blocks: _Optional[int] = ..., read_bytes_per_s: _Optional[float] = ..., weight_bytes: _Optional[int] = ..., resident_weight_bytes: _Optional[int] = ..., peak_rss_bytes: _Optional[int] = ..., rss_bytes: _Optional[int] = ...) -> None: ...

class CloseSessionRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class Frame(_message.Message):
    __slots__ = ("kind", "chunk", "sent_at_ns", "session_id", "rank", "nonce", "proof", "message", "protocol_version", "protection")
    class Kind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        KIND_UNSPECIFIED: _ClassVar[Frame.Kind]
        HELLO: _ClassVar[Frame.Kind]
        CHALLENGE: _ClassVar[Frame.Kind]
        WELCOME: _ClassVar[Frame.Kind]
        TENSOR: _ClassVar[Frame.Kind]
        ERROR: _ClassVar[Frame.Kind]
        BYE: _ClassVar[Frame.Kind]
        KEEPALIVE: _ClassVar[Frame.Kind]
    KIND_UNSPECIFIED: Frame.Kind
    HELLO: Frame.Kind
    CHALLENGE: Frame.Kind
    WELCOME: Frame.Kind
    TENSOR: Frame.Kind
    ERROR: Frame.Kind
    BYE: Frame.Kind
    KEEPALIVE: Frame.Kind
    KIND_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    SENT_AT_NS_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    NONCE_FIELD_NUMBER: _ClassVar[int]
    PROOF_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    PROTECTION_FIELD_NUMBER: _ClassVar[int]
    kind: Frame.Kind
    chunk: TensorChunk
    sent_at_ns: int
    session_id: str
    rank: int
    nonce: bytes
    proof: bytes
    message: str
    protocol_version: int
    protection: int
    def __init__(self, kind: _Optional[_Union[Frame.Kind, str]] = ..., chunk: _Optional[_Union[TensorChunk, _Mapping]] = ..., sent_at_ns: _Optional[int] = ..., session_id: _Optional[str] = ..., rank: _Optional[int] = ..., nonce: _Optional[bytes] = ..., proof: _Optional[bytes] = ..., message: _Optional[str] = ..., protocol_version: _Optional[int] = ..., protection: _Optional[int] = ...) -> None: ...
