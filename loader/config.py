"""Service configuration: one YAML mapping, validated on load; every error names its key."""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import pathlib
from typing import Any, Mapping

import yaml

from loader.errors import ConfigError


TOKEN_ENV = "LOADER_TOKEN"


@dataclasses.dataclass(frozen=True)
class TLSConfig:
    """PEM files of the server's TLS identity; `client_ca` set means mutual TLS."""

    cert: str
    key: str
    # Clients must present a certificate signed by this CA; None: any client may connect.
    client_ca: str | None = None


@dataclasses.dataclass(frozen=True)
class ServiceConfig:
    # Shard paths, brace patterns (`train-{000000..000009}.tar`) or globs.
    shards: tuple[str, ...] = ()
    # HOST:PORT for the gRPC server; port 0 lets the OS pick (printed as `listening on HOST:PORT`).
    address: str = "127.0.0.1:50051"
    # None: start a local Ray on loopback; "auto" or ray://...: join that cluster.
    ray_address: str | None = None
    # CPUs given to a local Ray (None: all of the machine's).
    num_cpus: int | None = None
    readers: int = 2
    # Decoded shards each reader keeps in memory (MiB); curated policies re-read the whole pool
    # every epoch, so a pool that fits is decoded once. 0 turns the cache off.
    reader_cache_mb: int = 256
    # Shard reads a curator keeps in flight.
    prefetch_shards: int = 2
    # Rows held back and sampled from, per job epoch; larger mixes shards better, costs memory.
    shuffle_rows: int = 4096
    # Batches a curator assembles ahead of the slowest request before it pauses reading.
    ready_batches: int = 16
    default_policy: str = "uniform"
    max_message_bytes: int = 256 * 1024 * 1024
    # A stream must send Hello within this many seconds.
    hello_timeout_s: float = 30.0
    # A job with no trainer connected for this long is checkpointed and its curator released; a
    # later Hello brings it back from its saved state.
    job_idle_s: float = 600.0
    # How often each job's selection state (learner losses, clusters, bandit, memory) is saved.
    checkpoint_s: float = 30.0
    # Folder for the registry, scores, selection state and batch journals; None: a private
    # temporary folder for this service's lifetime (enough for actor restarts, not for its own).
    state_dir: str | None = None
    log_level: str = "INFO"
    # The reference model of curated policies: {factory: "module:function", kwargs: {...},
    # weights: path}. None: only policies that need no reference (uniform, loss) can run.
    reference: Any = None
    # Which columns hold a sample's model input and its class label.
    columns: tuple[tuple[str, str], ...] = (("input", "x"), ("label", "y"))
    # Scorer actors (reference losses, embeddings, snapshot learner losses), and the fraction of
    # a GPU each takes when Ray has GPUs.
    scorers: int = 1
    scorer_gpus: float = 0.25
    # Defaults for curated policies: keep_ratio, selector, beta, learner_loss, ...; a trainer's
    # Hello options override them per job.
    selection: Any = dataclasses.field(default_factory=lambda: _default_selection())
    # A file holding the bearer token every RPC but health must carry. Only the path lives here,
    # so the secret never travels with the config (to Ray actors, into logs or reprs).
    token_file: str | None = None
    # TLS for the gRPC port; None serves plaintext.
    tls: TLSConfig | None = None

    @property
    def input_column(self) -> str:
        return dict(self.columns)["input"]

    @property
    def label_column(self) -> str:
        return dict(self.columns)["label"]


def _default_selection():
    from loader.selection.options import SelectionOptions

    return SelectionOptions()


_FIELDS = {f.name: f for f in dataclasses.fields(ServiceConfig)}
_POSITIVE_INTS = ("readers", "prefetch_shards", "ready_batches", "max_message_bytes", "scorers")
_NON_NEGATIVE_INTS = ("shuffle_rows", "reader_cache_mb")
_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def _check_type(key: str, value: Any, kind: type | tuple) -> None:
    if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        raise ConfigError(key, f"expected {_kind_name(kind)}, got a boolean")
    if not isinstance(value, kind):
        raise ConfigError(key, f"expected {_kind_name(kind)}, got {type(value).__name__} {value!r}")


def _kind_name(kind: type | tuple) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join({int: "an integer", float: "a number", str: "a string"}.get(k, k.__name__) for k in kinds)


def _normalise(key: str, value: Any) -> Any:
    if key == "shards":
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) and v for v in value):
            raise ConfigError(key, "expected a pattern or a list of non-empty path patterns")
        return tuple(value)
    if key in ("ray_address", "state_dir"):
        if value is not None:
            _check_type(key, value, str)
        return value
    if key == "num_cpus":
        if value is not None:
            _check_type(key, value, int)
            if value < 1:
                raise ConfigError(key, f"must be at least 1, got {value}")
        return value
    if key in _POSITIVE_INTS or key in _NON_NEGATIVE_INTS:
        _check_type(key, value, int)
        if value < (0 if key in _NON_NEGATIVE_INTS else 1):
            raise ConfigError(key, f"must be {'non-negative' if key in _NON_NEGATIVE_INTS else 'positive'}, got {value}")
        return value
    if key in ("hello_timeout_s", "job_idle_s", "checkpoint_s"):
        _check_type(key, value, (int, float))
        if not 0 < value < float("inf"):
            raise ConfigError(key, f"must be a positive finite number, got {value}")
        return float(value)
    if key == "address":
        _check_type(key, value, str)
        parse_address(value)
        return value
    if key == "log_level":
        _check_type(key, value, str)
        if value.upper() not in _LOG_LEVELS:
            raise ConfigError(key, f"expected one of {', '.join(_LOG_LEVELS)}, got {value!r}")
        return value.upper()
    if key == "reference":
        if value is None:
            return None
        from loader.scoring import ModelSpec

        return ModelSpec.from_mapping(value, key="reference")
    if key == "selection":
        from loader.selection.options import SelectionOptions, parse_options

        return SelectionOptions() if value is None else parse_options(value, key="selection")
    if key == "columns":
        if not isinstance(value, dict):
            raise ConfigError(key, f"expected a mapping with `input` and `label`, got {type(value).__name__}")
        unknown = sorted(set(value) - {"input", "label"})
        if unknown:
            raise ConfigError(f"columns.{unknown[0]}", "unknown key; known keys: input, label")
        merged = {"input": "x", "label": "y", **value}
        for name, column in merged.items():
            if not isinstance(column, str) or not column:
                raise ConfigError(f"columns.{name}", f"expected a column name, got {column!r}")
        return (("input", merged["input"]), ("label", merged["label"]))
    if key == "scorer_gpus":
        _check_type(key, value, (int, float))
        if not 0 <= value <= 1:
            raise ConfigError(key, f"must be between 0 and 1, got {value}")
        return float(value)
    if key == "token_file":
        if value is None:
            return None
        _check_type(key, value, str)
        _token_from_file(value)
        return value
    if key == "tls":
        return None if value is None else _tls(value)
    if key == "default_policy":
        _check_type(key, value, str)
        from loader.selection.policies import POLICIES

        if value not in POLICIES:
            raise ConfigError(key, f"unknown policy {value!r}; known: {', '.join(sorted(POLICIES))}")
        return value
    return value


def _read_file(key: str, path: str) -> bytes:
    try:
        return pathlib.Path(path).read_bytes()
    except FileNotFoundError:
        raise ConfigError(key, f"file {path!r} not found") from None
    except IsADirectoryError:
        raise ConfigError(key, f"{path!r} is a directory, expected a file") from None
    except OSError as exc:
        raise ConfigError(key, f"cannot read {path!r}: {exc.strerror}") from None


def _checked_token(key: str, token: str) -> str:
    # The messages never quote the token: they end up in logs and terminals.
    if not token:
        raise ConfigError(key, "is empty; give it a token, or remove it to run without authentication")
    if not all("!" <= ch <= "~" for ch in token):
        raise ConfigError(key, "the token must be printable ASCII without spaces (it travels in an HTTP/2 header)")
    return token


def _token_from_file(path: str) -> str:
    try:
        text = _read_file("token_file", path).decode("ascii")
    except UnicodeDecodeError:
        raise ConfigError("token_file", "the token must be printable ASCII without spaces") from None
    return _checked_token("token_file", text.strip())


def _tls(value: Any) -> TLSConfig:
    if not isinstance(value, dict):
        raise ConfigError("tls", f"expected a mapping of cert, key and optional client_ca, got {type(value).__name__}")
    known = ("cert", "key", "client_ca")
    unknown = sorted(set(value) - set(known))
    if unknown:
        raise ConfigError(f"tls.{unknown[0]}", f"unknown key; known keys: {', '.join(known)}")
    for name, what in (("cert", "certificate (chain)"), ("key", "private key")):
        if value.get(name) is None:
            raise ConfigError(f"tls.{name}", f"required: the PEM file of the server's {what}")
    for name in known:
        path = value.get(name)
        if path is None:
            continue
        if not isinstance(path, str) or not path:
            raise ConfigError(f"tls.{name}", f"expected a path to a PEM file, got {path!r}")
        if b"-----BEGIN " not in _read_file(f"tls.{name}", path):
            raise ConfigError(f"tls.{name}", f"{path!r} is not a PEM file (no -----BEGIN line)")
    return TLSConfig(cert=value["cert"], key=value["key"], client_ca=value.get("client_ca"))


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


def parse_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError("address", f"expected HOST:PORT with a port from 0 to 65535, got {address!r}")
    return host, int(port)


def is_loopback(address: str) -> bool:
    """True when HOST:PORT (or a unix: target) stays on this machine."""
    if address.startswith(("unix:", "unix-abstract:")):
        return True
    host = address.rpartition(":")[0] if ":" in address else address
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def from_mapping(values: dict[str, Any], source: str = "config") -> ServiceConfig:
    if not isinstance(values, dict):
        raise ConfigError(source, f"expected a mapping of keys to values, got {type(values).__name__}")
    unknown = sorted(set(values) - set(_FIELDS))
    if unknown:
        raise ConfigError(unknown[0], f"unknown key; known keys: {', '.join(sorted(_FIELDS))}")
    return ServiceConfig(**{k: _normalise(k, v) for k, v in values.items()})


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
