"""Service configuration: one YAML mapping, validated on load; every error names its key."""

from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Annotated, Any, Literal, Mapping

import yaml
from annotated_types import Interval, MinLen
from pydantic import AfterValidator, BeforeValidator, ConfigDict, PlainValidator, Strict, TypeAdapter, ValidationError

from loader.addresses import TOKEN_ENV, is_loopback, parse_address  # noqa: F401  (re-exported)
from loader.errors import ConfigError
from loader.selection.options import SelectionOptions, parse_options
from loader.selection.policies import POLICIES


# Each key below is declared once: its type and bounds in the annotation (read by pydantic when
# `from_mapping` validates a YAML mapping), its default on the dataclass. Strict: YAML reads
# `readers: yes` as True and `readers: "2"` as a string, and both are mistakes, not counts.
# No key has a use for NaN or infinity (NaN would slip through every bound).
_SCHEMA_CONFIG = ConfigDict(extra="forbid", allow_inf_nan=False)
_STRICT = Strict()
_POLICY_NAMES = tuple(sorted(POLICIES))
_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def _read_file(path: str) -> bytes:
    try:
        return pathlib.Path(path).read_bytes()
    except FileNotFoundError:
        raise ValueError(f"file {path!r} not found") from None
    except IsADirectoryError:
        raise ValueError(f"{path!r} is a directory, expected a file") from None
    except OSError as exc:
        raise ValueError(f"cannot read {path!r}: {exc.strerror}") from None


def _pem(path: str) -> str:
    if b"-----BEGIN " not in _read_file(path):
        raise ValueError(f"{path!r} is not a PEM file (no -----BEGIN line)")
    return path


_PEM_FILE = Annotated[str, _STRICT, MinLen(1), AfterValidator(_pem)]


@dataclasses.dataclass(frozen=True)
class TLSConfig:
    """PEM files of the server's TLS identity; `client_ca` set means mutual TLS."""

    __pydantic_config__ = _SCHEMA_CONFIG

    cert: _PEM_FILE  # the server's certificate (chain)
    key: _PEM_FILE  # its private key
    # Clients must present a certificate signed by this CA; None: any client may connect.
    client_ca: _PEM_FILE | None = None


@dataclasses.dataclass(frozen=True)
class _Columns:
    __pydantic_config__ = _SCHEMA_CONFIG

    input: Annotated[str, _STRICT, MinLen(1)] = "x"
    label: Annotated[str, _STRICT, MinLen(1)] = "y"
    # A column of precomputed embeddings (or any numeric features) that clusters, diversity and
    # the pool budget use instead of the reference model's body; None: the body's output.
    embedding: Annotated[str, _STRICT, MinLen(1)] | None = None


_COLUMNS = TypeAdapter(_Columns)


def _patterns(value: Any) -> Any:
    # One pattern may be written without a list; a list becomes the tuple the config holds.
    return (value,) if isinstance(value, str) else tuple(value) if isinstance(value, list) else value


# The checks that raise ConfigError elsewhere raise ValueError here, so that pydantic goes on and
# an unknown key (reported first) is not hidden behind them.
def _address(address: str) -> str:
    try:
        parse_address(address)
    except ConfigError as exc:
        raise ValueError(exc.problem) from None
    return address


def _token_file(path: str) -> str:
    try:
        _token_from_file(path)
    except ConfigError as exc:
        raise ValueError(exc.problem) from None
    return path


def _reference(value: Any) -> Any:
    if value is None:
        return None
    from loader.scoring import ModelSpec  # imports torch: only when a reference is configured

    return ModelSpec.from_mapping(value, key="reference")


def _columns(value: Any) -> tuple[tuple[str, str], ...]:
    try:
        columns = _COLUMNS.validate_python(value)
    except ValidationError as exc:
        raise ConfigError.from_validation(exc, _Columns, "columns") from None
    named = (("input", columns.input), ("label", columns.label))
    return named + ((("embedding", columns.embedding),) if columns.embedding is not None else ())


def _resources(key: str):
    """A mapping of Ray resource names to amounts, kept as sorted (name, amount) pairs."""

    def check(value: Any) -> tuple[tuple[str, float], ...]:
        if value is None:
            return ()
        if not isinstance(value, dict):
            raise ConfigError(key, f"expected a mapping of Ray resource names to amounts, got {type(value).__name__}")
        pairs = []
        for name, amount in value.items():
            if not isinstance(name, str) or not name or name in ("CPU", "GPU", "memory"):
                raise ConfigError(f"{key}.{name}", "expected a custom resource name (CPU and GPU have keys of their own)")
            if isinstance(amount, bool) or not isinstance(amount, (int, float)) or not amount > 0:
                raise ConfigError(f"{key}.{name}", f"expected an amount > 0, got {amount!r}")
            pairs.append((name, float(amount)))
        return tuple(sorted(pairs))

    return check


def _selection(value: Any) -> SelectionOptions:
    return SelectionOptions() if value is None else parse_options(value, key="selection")


def _upper(value: Any) -> Any:
    return value.upper() if isinstance(value, str) else value


_COUNT = Annotated[int, _STRICT, Interval(ge=1)]
_SIZE = Annotated[int, _STRICT, Interval(ge=0)]
_SECONDS = Annotated[float, _STRICT, Interval(gt=0)]
_TEXT = Annotated[str, _STRICT]


@dataclasses.dataclass(frozen=True)
class RemoteConfig:
    """Remote and pipe: shards (loader.sources.remote_settings): each key left out is taken from
    LOADER_REMOTE_<KEY> in the service's environment, else its default."""

    __pydantic_config__ = _SCHEMA_CONFIG

    cache_dir: Annotated[str, _STRICT, MinLen(1)] | None = None  # default ~/.cache/loader/remote-shards
    cache_mb: Annotated[float, _STRICT, Interval(ge=0)] | None = None  # default 10240
    attempts: _COUNT | None = None  # default 5
    backoff_s: Annotated[float, _STRICT, Interval(ge=0)] | None = None  # default 0.5
    backoff_max_s: Annotated[float, _STRICT, Interval(ge=0)] | None = None  # default 8
    timeout_s: _SECONDS | None = None  # default 30
    allow_pipe: Annotated[bool, _STRICT] | None = None  # default false: pipe: runs shell commands

    def settings(self):
        from loader.sources.remote_settings import RemoteSettings

        return RemoteSettings.from_env(**dataclasses.asdict(self))


@dataclasses.dataclass(frozen=True)
class ServiceConfig:
    """The service's settings. `from_mapping` checks them; code that builds one itself is trusted."""

    __pydantic_config__ = _SCHEMA_CONFIG

    # Shard paths, brace patterns (`train-{000000..000009}.tar`) or globs.
    shards: Annotated[tuple[Annotated[str, _STRICT, MinLen(1)], ...], BeforeValidator(_patterns)] = ()
    # Patterns polled every `watch_poll_s` while the service runs: a new matching file joins the
    # pool once its size and mtime are unchanged across two polls (see loader/watch.py).
    watch: Annotated[tuple[Annotated[str, _STRICT, MinLen(1)], ...], BeforeValidator(_patterns)] = ()
    watch_poll_s: _SECONDS = 5.0
    # The pool budget: past this many samples, samples are pruned for good, cluster by cluster
    # (near-duplicates first, then those the reference fits worst). Needs `reference`.
    max_samples: _COUNT | None = None
    # HOST:PORT for the gRPC server; port 0 lets the OS pick (printed as `listening on HOST:PORT`).
    address: Annotated[str, _STRICT, AfterValidator(_address)] = "127.0.0.1:50051"
    # None: start a local Ray on loopback; "auto" or ray://...: join that cluster.
    ray_address: _TEXT | None = None
    # CPUs given to a local Ray (None: all of the machine's).
    num_cpus: _COUNT | None = None
    readers: _COUNT = 2
    # gRPC gateway processes, all on `address` (SO_REUSEPORT; the kernel spreads connections over
    # them): the gateway gathers and frames every payload byte, and one process uses one core.
    gateways: Annotated[int, _STRICT, Interval(ge=1, le=64)] = 1
    # Ray custom resources each reader / scorer actor asks for, e.g. {loader_reader: 1}: they go to
    # the nodes that advertise them (k8s/raycluster.yaml: readers on the CPU group, scorers on the
    # GPU group). Empty: anywhere Ray finds room.
    reader_resources: Annotated[tuple[tuple[str, float], ...], PlainValidator(_resources("reader_resources"))] = ()
    scorer_resources: Annotated[tuple[tuple[str, float], ...], PlainValidator(_resources("scorer_resources"))] = ()
    # Decoded shards each reader keeps in memory (MiB); curated policies re-read the whole pool
    # every epoch, so a pool that fits is decoded once. 0 turns the cache off.
    reader_cache_mb: _SIZE = 256
    # Shard reads a curator keeps in flight.
    prefetch_shards: _COUNT = 2
    # Rows held back and sampled from, per job epoch; larger mixes shards better, costs memory.
    shuffle_rows: _SIZE = 4096
    # Super-batches per rank a curator reads ahead of what it has chosen before it pauses reading.
    ready_batches: _COUNT = 16
    # Batches per rank chosen ahead of a request. 0: each is chosen when asked for, with the
    # freshest learner losses (2 cost snapshot learnability 1.84x -> 1.38x, BENCHMARKS.md).
    select_ahead: _SIZE = 0
    default_policy: Literal[_POLICY_NAMES] = "uniform"
    max_message_bytes: _COUNT = 256 * 1024 * 1024
    # A stream must send Hello within this many seconds.
    hello_timeout_s: _SECONDS = 30.0
    # A job with no trainer connected for this long is checkpointed and its curator released; a
    # later Hello brings it back from its saved state.
    job_idle_s: _SECONDS = 600.0
    # How often each job's selection state (learner losses, clusters, bandit, memory) is saved.
    checkpoint_s: _SECONDS = 30.0
    # Folder for the registry, scores, selection state and batch journals; None: a private
    # temporary folder for this service's lifetime (enough for actor restarts, not for its own).
    state_dir: _TEXT | None = None
    # Case-insensitive in the YAML, upper case here.
    log_level: Annotated[Literal[_LOG_LEVELS], BeforeValidator(_upper)] = "INFO"
    # The reference model of curated policies: {factory: "module:function", kwargs: {...},
    # weights: path}, held as a loader.scoring.ModelSpec. None: only policies that need no
    # reference (uniform, loss) can run.
    reference: Annotated[Any, PlainValidator(_reference)] = None
    # Which columns hold a sample's model input and its class label; written as a mapping.
    columns: Annotated[tuple[tuple[str, str], ...], PlainValidator(_columns)] = (("input", "x"), ("label", "y"))
    # Scorer actors (reference losses, embeddings, snapshot learner losses), and the fraction of
    # a GPU each takes when Ray has GPUs.
    scorers: _COUNT = 1
    scorer_gpus: Annotated[float, _STRICT, Interval(ge=0, le=1)] = 0.25
    # Defaults for curated policies: keep_ratio, selector, beta, learner_loss, ...; a trainer's
    # Hello options override them per job. Written as a mapping, checked by parse_options.
    selection: Annotated[SelectionOptions, PlainValidator(_selection)] = dataclasses.field(
        default_factory=SelectionOptions
    )
    # A file holding the bearer token every RPC but health must carry. Only the path lives here,
    # so the secret never travels with the config (to Ray actors, into logs or reprs).
    token_file: Annotated[str, _STRICT, AfterValidator(_token_file)] | None = None
    # TLS for the gRPC port; None serves plaintext.
    tls: TLSConfig | None = None
    # Remote (https://, s3://, gs://) and pipe: shards: read cache, retries, timeouts, pipe: on/off.
    remote: RemoteConfig = dataclasses.field(default_factory=RemoteConfig)

    @property
    def input_column(self) -> str:
        return dict(self.columns)["input"]

    @property
    def label_column(self) -> str:
        return dict(self.columns)["label"]

    @property
    def embedding_column(self) -> str | None:
        return dict(self.columns).get("embedding")


_SCHEMA = TypeAdapter(ServiceConfig)


def _checked_token(key: str, token: str) -> str:
    # The messages never quote the token: they end up in logs and terminals.
    if not token:
        raise ConfigError(key, "is empty; give it a token, or remove it to run without authentication")
    if not all("!" <= ch <= "~" for ch in token):
        raise ConfigError(key, "the token must be printable ASCII without spaces (it travels in an HTTP/2 header)")
    return token


def _token_from_file(path: str) -> str:
    try:
        text = _read_file(path).decode("ascii")
    except UnicodeDecodeError:
        raise ConfigError("token_file", "the token must be printable ASCII without spaces") from None
    except ValueError as exc:
        raise ConfigError("token_file", str(exc)) from None
    return _checked_token("token_file", text.strip())


def read_token(config: ServiceConfig, environ: Mapping[str, str] | None = None) -> str | None:
    """The bearer token the service requires: `token_file`'s stripped content, else $LOADER_TOKEN,
    else None (no authentication). A set but blank $LOADER_TOKEN is an error rather than "no auth":
    it is what a Secret with a missing key looks like, and failing open would expose the data."""
    if config.token_file is not None:
        return _token_from_file(config.token_file)
    environ = os.environ if environ is None else environ
    if TOKEN_ENV not in environ:
        return None
    return _checked_token(f"${TOKEN_ENV}", environ[TOKEN_ENV].strip())


def from_mapping(values: dict[str, Any], source: str = "config") -> ServiceConfig:
    if not isinstance(values, dict):
        raise ConfigError(source, f"expected a mapping of keys to values, got {type(values).__name__}")
    try:
        config = _SCHEMA.validate_python(values)
    except ValidationError as exc:
        raise ConfigError.from_validation(exc, ServiceConfig) from None
    if config.max_samples is not None and config.reference is None and config.embedding_column is None:
        raise ConfigError(
            "max_samples", "the pool budget clusters samples by embeddings: set `reference` or `columns.embedding`"
        )
    return config


def load(
    path: str | pathlib.Path | None, overrides: dict[str, Any] | None = None, require_shards: bool = True
) -> ServiceConfig:
    """Reads a YAML file (optional), applies overrides whose value is not None, validates."""
    values: dict[str, Any] = {}
    if path is not None:
        path = pathlib.Path(path)
        try:
            loaded = yaml.safe_load(path.read_text())
        except FileNotFoundError:
            raise ConfigError("--config", f"file {str(path)!r} not found") from None
        except yaml.YAMLError as exc:
            raise ConfigError("--config", f"{path} is not valid YAML: {exc}") from None
        if loaded is not None:
            if not isinstance(loaded, dict):
                raise ConfigError("--config", f"{path} must hold a mapping, got {type(loaded).__name__}")
            values.update(loaded)
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    config = from_mapping(values)
    if require_shards and not config.shards:
        raise ConfigError("shards", "no shards given (set `shards` in the config or pass --shards)")
    return config
