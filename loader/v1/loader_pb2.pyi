from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Hello(_message.Message):
    __slots__ = ("job", "rank", "world_size", "batch_size", "policy", "seed", "epoch", "next_seq", "options", "total_epochs", "stream")
    class OptionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    JOB_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    NEXT_SEQ_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_EPOCHS_FIELD_NUMBER: _ClassVar[int]
    STREAM_FIELD_NUMBER: _ClassVar[int]
    job: str
    rank: int
    world_size: int
    batch_size: int
    policy: str
    seed: int
    epoch: int
    next_seq: int
    options: _containers.ScalarMap[str, str]
    total_epochs: int
    stream: bool
    def __init__(self, job: _Optional[str] = ..., rank: _Optional[int] = ..., world_size: _Optional[int] = ..., batch_size: _Optional[int] = ..., policy: _Optional[str] = ..., seed: _Optional[int] = ..., epoch: _Optional[int] = ..., next_seq: _Optional[int] = ..., options: _Optional[_Mapping[str, str]] = ..., total_epochs: _Optional[int] = ..., stream: _Optional[bool] = ...) -> None: ...

class Credit(_message.Message):
    __slots__ = ("batches",)
    BATCHES_FIELD_NUMBER: _ClassVar[int]
    batches: int
    def __init__(self, batches: _Optional[int] = ...) -> None: ...

class Ack(_message.Message):
    __slots__ = ("epoch", "seq")
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    epoch: int
    seq: int
    def __init__(self, epoch: _Optional[int] = ..., seq: _Optional[int] = ...) -> None: ...

class Feedback(_message.Message):
    __slots__ = ("ids", "losses")
    IDS_FIELD_NUMBER: _ClassVar[int]
    LOSSES_FIELD_NUMBER: _ClassVar[int]
    ids: bytes
    losses: bytes
    def __init__(self, ids: _Optional[bytes] = ..., losses: _Optional[bytes] = ...) -> None: ...

class TrainRequest(_message.Message):
    __slots__ = ("hello", "credit", "ack", "feedback")
    HELLO_FIELD_NUMBER: _ClassVar[int]
    CREDIT_FIELD_NUMBER: _ClassVar[int]
    ACK_FIELD_NUMBER: _ClassVar[int]
    FEEDBACK_FIELD_NUMBER: _ClassVar[int]
    hello: Hello
    credit: Credit
    ack: Ack
    feedback: Feedback
    def __init__(self, hello: _Optional[_Union[Hello, _Mapping]] = ..., credit: _Optional[_Union[Credit, _Mapping]] = ..., ack: _Optional[_Union[Ack, _Mapping]] = ..., feedback: _Optional[_Union[Feedback, _Mapping]] = ...) -> None: ...

class Batch(_message.Message):
    __slots__ = ("epoch", "seq", "rows", "arrow_ipc")
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    ARROW_IPC_FIELD_NUMBER: _ClassVar[int]
    epoch: int
    seq: int
    rows: int
    arrow_ipc: bytes
    def __init__(self, epoch: _Optional[int] = ..., seq: _Optional[int] = ..., rows: _Optional[int] = ..., arrow_ipc: _Optional[bytes] = ...) -> None: ...

class Status(_message.Message):
    __slots__ = ("code", "epoch", "message", "policy", "batches")
    class Code(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        CODE_UNSPECIFIED: _ClassVar[Status.Code]
        READY: _ClassVar[Status.Code]
        END_OF_EPOCH: _ClassVar[Status.Code]
    CODE_UNSPECIFIED: Status.Code
    READY: Status.Code
    END_OF_EPOCH: Status.Code
    CODE_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    BATCHES_FIELD_NUMBER: _ClassVar[int]
    code: Status.Code
    epoch: int
    message: str
    policy: str
    batches: int
    def __init__(self, code: _Optional[_Union[Status.Code, str]] = ..., epoch: _Optional[int] = ..., message: _Optional[str] = ..., policy: _Optional[str] = ..., batches: _Optional[int] = ...) -> None: ...

class TrainResponse(_message.Message):
    __slots__ = ("batch", "status")
    BATCH_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    batch: Batch
    status: Status
    def __init__(self, batch: _Optional[_Union[Batch, _Mapping]] = ..., status: _Optional[_Union[Status, _Mapping]] = ...) -> None: ...

class GetStatsRequest(_message.Message):
    __slots__ = ("job",)
    JOB_FIELD_NUMBER: _ClassVar[int]
    job: str
    def __init__(self, job: _Optional[str] = ...) -> None: ...

class ShardInfo(_message.Message):
    __slots__ = ("index", "uri", "state", "reason", "rows")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    URI_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    index: int
    uri: str
    state: str
    reason: str
    rows: int
    def __init__(self, index: _Optional[int] = ..., uri: _Optional[str] = ..., state: _Optional[str] = ..., reason: _Optional[str] = ..., rows: _Optional[int] = ...) -> None: ...

class JobInfo(_message.Message):
    __slots__ = ("job", "policy", "world_size", "batch_size", "epoch", "batches_served", "samples_served", "feedback_samples", "samples_considered", "weight_pushes", "weights_step", "options", "learner_scored_samples", "learner_scoring_seconds", "clusters", "selection_seconds", "selections", "unacked_batches", "snapshot_staleness_mean", "snapshot_staleness_max", "snapshot_staleness_batches")
    class OptionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    JOB_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    BATCHES_SERVED_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_SERVED_FIELD_NUMBER: _ClassVar[int]
    FEEDBACK_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_CONSIDERED_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_PUSHES_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_STEP_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    LEARNER_SCORED_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    LEARNER_SCORING_SECONDS_FIELD_NUMBER: _ClassVar[int]
    CLUSTERS_FIELD_NUMBER: _ClassVar[int]
    SELECTION_SECONDS_FIELD_NUMBER: _ClassVar[int]
    SELECTIONS_FIELD_NUMBER: _ClassVar[int]
    UNACKED_BATCHES_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_STALENESS_MEAN_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_STALENESS_MAX_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_STALENESS_BATCHES_FIELD_NUMBER: _ClassVar[int]
    job: str
    policy: str
    world_size: int
    batch_size: int
    epoch: int
    batches_served: int
    samples_served: int
    feedback_samples: int
    samples_considered: int
    weight_pushes: int
    weights_step: int
    options: _containers.ScalarMap[str, str]
    learner_scored_samples: int
    learner_scoring_seconds: float
    clusters: _containers.RepeatedCompositeFieldContainer[ClusterInfo]
    selection_seconds: float
    selections: int
    unacked_batches: int
    snapshot_staleness_mean: float
    snapshot_staleness_max: int
    snapshot_staleness_batches: int
    def __init__(self, job: _Optional[str] = ..., policy: _Optional[str] = ..., world_size: _Optional[int] = ..., batch_size: _Optional[int] = ..., epoch: _Optional[int] = ..., batches_served: _Optional[int] = ..., samples_served: _Optional[int] = ..., feedback_samples: _Optional[int] = ..., samples_considered: _Optional[int] = ..., weight_pushes: _Optional[int] = ..., weights_step: _Optional[int] = ..., options: _Optional[_Mapping[str, str]] = ..., learner_scored_samples: _Optional[int] = ..., learner_scoring_seconds: _Optional[float] = ..., clusters: _Optional[_Iterable[_Union[ClusterInfo, _Mapping]]] = ..., selection_seconds: _Optional[float] = ..., selections: _Optional[int] = ..., unacked_batches: _Optional[int] = ..., snapshot_staleness_mean: _Optional[float] = ..., snapshot_staleness_max: _Optional[int] = ..., snapshot_staleness_batches: _Optional[int] = ...) -> None: ...

class ClusterInfo(_message.Message):
    __slots__ = ("id", "size", "weight", "reward", "served", "reference_loss")
    ID_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    REWARD_FIELD_NUMBER: _ClassVar[int]
    SERVED_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_LOSS_FIELD_NUMBER: _ClassVar[int]
    id: int
    size: int
    weight: float
    reward: float
    served: int
    reference_loss: float
    def __init__(self, id: _Optional[int] = ..., size: _Optional[int] = ..., weight: _Optional[float] = ..., reward: _Optional[float] = ..., served: _Optional[int] = ..., reference_loss: _Optional[float] = ...) -> None: ...

class Stats(_message.Message):
    __slots__ = ("shards", "jobs", "trainers_connected", "reference_scored_samples", "reference_scoring_seconds", "scorer_devices", "budget", "reference_weights", "rescore_pending")
    SHARDS_FIELD_NUMBER: _ClassVar[int]
    JOBS_FIELD_NUMBER: _ClassVar[int]
    TRAINERS_CONNECTED_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_SCORED_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_SCORING_SECONDS_FIELD_NUMBER: _ClassVar[int]
    SCORER_DEVICES_FIELD_NUMBER: _ClassVar[int]
    BUDGET_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    RESCORE_PENDING_FIELD_NUMBER: _ClassVar[int]
    shards: _containers.RepeatedCompositeFieldContainer[ShardInfo]
    jobs: _containers.RepeatedCompositeFieldContainer[JobInfo]
    trainers_connected: int
    reference_scored_samples: int
    reference_scoring_seconds: float
    scorer_devices: _containers.RepeatedScalarFieldContainer[str]
    budget: PoolBudget
    reference_weights: str
    rescore_pending: int
    def __init__(self, shards: _Optional[_Iterable[_Union[ShardInfo, _Mapping]]] = ..., jobs: _Optional[_Iterable[_Union[JobInfo, _Mapping]]] = ..., trainers_connected: _Optional[int] = ..., reference_scored_samples: _Optional[int] = ..., reference_scoring_seconds: _Optional[float] = ..., scorer_devices: _Optional[_Iterable[str]] = ..., budget: _Optional[_Union[PoolBudget, _Mapping]] = ..., reference_weights: _Optional[str] = ..., rescore_pending: _Optional[int] = ...) -> None: ...

class PoolBudget(_message.Message):
    __slots__ = ("max_samples", "kept_samples", "pruned_near_duplicate", "pruned_low_value", "clusters")
    MAX_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    KEPT_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    PRUNED_NEAR_DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    PRUNED_LOW_VALUE_FIELD_NUMBER: _ClassVar[int]
    CLUSTERS_FIELD_NUMBER: _ClassVar[int]
    max_samples: int
    kept_samples: int
    pruned_near_duplicate: int
    pruned_low_value: int
    clusters: int
    def __init__(self, max_samples: _Optional[int] = ..., kept_samples: _Optional[int] = ..., pruned_near_duplicate: _Optional[int] = ..., pruned_low_value: _Optional[int] = ..., clusters: _Optional[int] = ...) -> None: ...

class AddShardsRequest(_message.Message):
    __slots__ = ("uris",)
    URIS_FIELD_NUMBER: _ClassVar[int]
    uris: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, uris: _Optional[_Iterable[str]] = ...) -> None: ...

class AddShardsResponse(_message.Message):
    __slots__ = ("shards",)
    SHARDS_FIELD_NUMBER: _ClassVar[int]
    shards: _containers.RepeatedCompositeFieldContainer[ShardInfo]
    def __init__(self, shards: _Optional[_Iterable[_Union[ShardInfo, _Mapping]]] = ...) -> None: ...

class WeightsChunk(_message.Message):
    __slots__ = ("job", "step", "data")
    JOB_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    job: str
    step: int
    data: bytes
    def __init__(self, job: _Optional[str] = ..., step: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class PushWeightsResponse(_message.Message):
    __slots__ = ("bytes_received", "step")
    BYTES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    bytes_received: int
    step: int
    def __init__(self, bytes_received: _Optional[int] = ..., step: _Optional[int] = ...) -> None: ...

class SetReferenceRequest(_message.Message):
    __slots__ = ("weights",)
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    weights: str
    def __init__(self, weights: _Optional[str] = ...) -> None: ...

class SetReferenceResponse(_message.Message):
    __slots__ = ("fingerprint", "shards_to_rescore")
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    SHARDS_TO_RESCORE_FIELD_NUMBER: _ClassVar[int]
    fingerprint: str
    shards_to_rescore: int
    def __init__(self, fingerprint: _Optional[str] = ..., shards_to_rescore: _Optional[int] = ...) -> None: ...
