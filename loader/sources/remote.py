"""Remote shards (`https://`, `http://`, `s3://`, `gs://`): fetched through fsspec into a local,
size-bounded read cache, with bounded retries on transient errors.

Credentials come from the environment the way each filesystem reads them (for S3:
AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN / AWS_PROFILE, and AWS_ENDPOINT_URL
for an S3-compatible server; for gs://: gcsfs's own). `LOADER_STORAGE_OPTIONS` may hold a JSON
mapping from protocol to extra fsspec storage options (`{"s3": {"anon": true}}`).

Remote shards are taken as immutable: a copy in the read cache (loader.sources.file_cache) is
served without asking the server again. The cache bound, retries and timeouts are the process's
RemoteSettings (loader.sources.remote_settings: the config's `remote` keys, or LOADER_REMOTE_*).

Reasons and log lines name a URI without its user info or query (where signed URLs keep their
tokens), and any credential value found in the environment is blanked out of them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import random
import time
import urllib.parse
from collections.abc import Callable, Iterator

from loader.errors import ShardError
from loader.sources import remote_settings
from loader.sources.file_cache import FileCache

log = logging.getLogger("loader.remote")

SCHEMES = frozenset({"http", "https", "s3", "s3a", "gs", "gcs"})
# The package fsspec needs for each protocol, for a clear reason when it is missing.
PACKAGES = {"http": "aiohttp", "https": "aiohttp", "s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs"}
SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID", "GOOGLE_APPLICATION_CREDENTIALS_JSON")

@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    """Attempts in all (the first included); waits grow from `base_s` by `factor` up to `max_s`,
    each with up to 25% jitter so that readers retrying together spread out."""

    attempts: int = 5
    base_s: float = 0.5
    factor: float = 2.0
    max_s: float = 8.0
    timeout_s: float = 30.0  # per connection attempt and per socket read

    def delay(self, attempt: int) -> float:
        wait = min(self.base_s * self.factor**attempt, self.max_s)
        return wait * (1 + random.uniform(0, 0.25))

    @classmethod
    def current(cls) -> RetryPolicy:
        """The policy of this process's settings (loader.sources.remote_settings)."""
        settings = remote_settings.current()
        return cls(attempts=settings.attempts, base_s=settings.backoff_s, max_s=settings.backoff_max_s,
                   timeout_s=settings.timeout_s)  # fmt: skip


def scheme(uri: str) -> str:
    return uri.split("://", 1)[0].lower() if "://" in uri else ""


def is_remote(uri: str) -> bool:
    return scheme(uri) in SCHEMES


def redact(uri: str) -> str:
    """The URI without user info (`user:password@`) or query (signed-URL tokens)."""
    parts = urllib.parse.urlsplit(uri)
    netloc = parts.netloc.rpartition("@")[2]
    query = "<redacted>" if parts.query else ""
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, query, ""))


def scrub(text: str, uri: str = "") -> str:
    """`text` with any credential from the environment or from `uri` blanked out."""
    secrets = [os.environ.get(name, "") for name in SECRET_ENV]
    if uri:
        parts = urllib.parse.urlsplit(uri)
        secrets += [parts.password or "", parts.username or "", parts.query]
        if "@" in parts.netloc:
            secrets.append(parts.netloc.rpartition("@")[0])
    for secret in sorted((s for s in secrets if len(s) >= 4), key=len, reverse=True):
        text = text.replace(secret, "<redacted>")
    return text


def url_path(uri: str) -> str:
    """The path part, which names the format (`.tar`, `.parquet`)."""
    return urllib.parse.urlsplit(uri).path


_SECRETS: set[str] = set()  # credentials seen in URIs, blanked out of fsspec's debug log


class _Scrubber(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if _SECRETS:
            message = record.getMessage()
            for secret in sorted(_SECRETS, key=len, reverse=True):
                message = message.replace(secret, "<redacted>")
            record.msg, record.args = message, ()
        return True


logging.getLogger("fsspec.http").addFilter(_Scrubber())


def _split_auth(uri: str) -> tuple[str, tuple[str, str] | None]:
    """(`uri` without user info, (user, password) or None)."""
    parts = urllib.parse.urlsplit(uri)
    if "@" not in parts.netloc:
        return uri, None
    userinfo, _, host = parts.netloc.rpartition("@")
    user, _, password = userinfo.partition(":")
    _SECRETS.update(s for s in (userinfo, password) if len(s) >= 4)
    bare = urllib.parse.urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))
    return bare, (urllib.parse.unquote(user), urllib.parse.unquote(password))


def _storage_options(protocol: str, policy: RetryPolicy, auth: tuple[str, str] | None = None) -> dict:
    options: dict = {}
    if protocol in ("http", "https"):
        import aiohttp

        timeout = aiohttp.ClientTimeout(total=None, sock_connect=policy.timeout_s, sock_read=policy.timeout_s)
        options["client_kwargs"] = {"timeout": timeout}
        if auth is not None:  # sent as a header, so that the URL fsspec logs holds no password
            encode = getattr(aiohttp, "encode_basic_auth", None)
            header = encode(*auth) if encode else aiohttp.BasicAuth(*auth).encode()
            _SECRETS.add(header.split(" ", 1)[-1])
            options["client_kwargs"]["headers"] = {"Authorization": header}
    elif protocol in ("s3", "s3a"):
        # One attempt each in botocore and s3fs: the retries are ours, so that they are bounded
        # and logged the same way for every protocol.
        options["config_kwargs"] = {
            "connect_timeout": policy.timeout_s,
            "read_timeout": policy.timeout_s,
            "retries": {"max_attempts": 1, "mode": "standard"},
        }
        endpoint = os.environ.get("LOADER_S3_ENDPOINT")
        if endpoint:  # AWS_ENDPOINT_URL is honoured by botocore itself
            options["endpoint_url"] = endpoint
    extra = os.environ.get("LOADER_STORAGE_OPTIONS")
    if extra:
        try:
            options.update(json.loads(extra).get(protocol, {}))
        except (ValueError, AttributeError) as exc:
            raise ShardError("LOADER_STORAGE_OPTIONS", f"not a JSON mapping of protocol to options: {exc}") from None
    return options


def filesystem(uri: str, policy: RetryPolicy | None = None):
    """(fsspec filesystem, path) for `uri`; a missing package is a ShardError naming it."""
    policy = policy or RetryPolicy.current()
    protocol = scheme(uri)
    auth = None
    if protocol in ("http", "https"):
        uri, auth = _split_auth(uri)
        query = urllib.parse.urlsplit(uri).query
        if len(query) >= 4:
            _SECRETS.add(query)
    try:
        import fsspec

        fs, path = fsspec.core.url_to_fs(uri, **_storage_options(protocol, policy, auth))
    except ImportError as exc:
        package = PACKAGES.get(protocol, getattr(exc, "name", None) or "fsspec")
        raise ShardError(
            redact(uri), f"reading {protocol}:// URIs needs the {package!r} package, which is not installed "
            f"(pip install {package})",
        ) from None
    if protocol in ("s3", "s3a"):
        fs.retries = 1  # s3fs's own retry loop (a class attribute, not an option): ours governs
    return fs, path


# --- errors -------------------------------------------------------------------------------------

_TRANSIENT_CODES = frozenset({"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout",
                              "RequestTimeoutException", "InternalError", "ServiceUnavailable",
                              "TooManyRequests", "RequestLimitExceeded"})  # fmt: skip


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _status(exc: BaseException) -> int | None:
    status = getattr(exc, "status", None)  # aiohttp.ClientResponseError
    if isinstance(status, int):
        return status
    response = getattr(exc, "response", None)  # botocore ClientError
    if isinstance(response, dict):
        return response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return None


def classify(exc: BaseException) -> tuple[bool, str]:
    """(transient?, reason) for an error fetching a remote shard."""
    for link in _chain(exc):
        if isinstance(link, FileNotFoundError):
            return False, "not found"
        if isinstance(link, PermissionError):
            return False, f"access denied: {link}"
        status = _status(link)
        code = ""
        response = getattr(link, "response", None)
        if isinstance(response, dict):
            code = response.get("Error", {}).get("Code", "")
        if status == 404 or code in ("NoSuchKey", "NoSuchBucket", "404"):
            return False, "not found"
        if status in (401, 403) or code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            return False, f"access denied (HTTP {status or code})"
        if (status is not None and (status >= 500 or status in (408, 429))) or code in _TRANSIENT_CODES:
            return True, f"HTTP {status}" + (f" {code}" if code else "")
        if status is not None and status >= 400:
            return False, f"HTTP {status}"
        name = type(link).__name__
        if isinstance(link, (ConnectionError, TimeoutError)) or name in (
            "ClientConnectionError", "ClientConnectorError", "ServerDisconnectedError", "ClientPayloadError",
            "ServerTimeoutError", "ConnectionTimeoutError", "SocketTimeoutError", "EndpointConnectionError",
            "ConnectTimeoutError", "ReadTimeoutError", "ConnectionClosedError", "IncompleteReadError",
            "ResponseStreamingError",
        ):  # fmt: skip
            return True, f"{name}: {link}" if str(link) else name
    return False, f"{type(exc).__name__}: {exc}"


def with_retries(uri: str, action: Callable[[], object], policy: RetryPolicy | None = None):
    """`action()`, retried with exponential backoff while it fails transiently; a ShardError
    naming the (redacted) URI and the last reason once it fails for good."""
    policy = policy or RetryPolicy.current()
    shown = redact(uri)
    for attempt in range(policy.attempts):
        try:
            return action()
        except ShardError:
            raise
        except Exception as exc:
            transient, reason = classify(exc)
            reason = scrub(reason, uri)
            if not transient:
                raise ShardError(shown, reason) from None
            if attempt + 1 == policy.attempts:
                raise ShardError(shown, f"unreachable after {policy.attempts} attempts: {reason}") from None
            wait = policy.delay(attempt)
            log.warning("reading %s failed (%s); retry %d of %d in %.2fs",
                        shown, reason, attempt + 1, policy.attempts - 1, wait)  # fmt: skip
            time.sleep(wait)
    raise AssertionError("unreachable")


def local_copy(uri: str) -> contextlib.AbstractContextManager[str]:
    """The remote shard `uri` as a local file (see FileCache.local_copy), fetched with retries."""
    policy = RetryPolicy.current()
    fs, path = filesystem(uri, policy)

    def fetch(tmp: str) -> None:
        with_retries(uri, lambda: fs.get_file(path, tmp), policy)

    return FileCache.current().local_copy(uri, fetch)


def cached_path(uri: str) -> str | None:
    """The cached copy of `uri` if there is one (not marked as used)."""
    path = FileCache.current().path(uri)
    return path if os.path.isfile(path) else None


def glob(pattern: str) -> list[str]:
    """URIs matching a remote glob, sorted; a ShardError when the listing fails."""
    policy = RetryPolicy.current()
    fs, path = filesystem(pattern, policy)
    matches = with_retries(pattern, lambda: fs.glob(path), policy)
    uris = []
    for match in matches:
        uri = match if "://" in match else fs.unstrip_protocol(match)
        uris.append(uri)
    return sorted(uris)
