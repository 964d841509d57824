"""Remote shards over real servers on 127.0.0.1: an http.server for http(s) URIs and moto's S3
server for s3:// URIs, read through fsspec into the size-bounded local read cache."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import tempfile
import threading
import time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from loader.errors import ShardError
from loader.ids import make_ids
from loader.reader import read_with_ids
from loader.registry import ShardRegistry, missing_at_registration
from loader.shard_cache import ShardCache
from loader.sources import expand, read_shard
from loader.sources.remote import FileCache

# Set at collection, before the session's Ray starts, so that the reader actors of the end-to-end
# test cache under /tmp rather than in ~/.cache (each test below sets its own folder).
os.environ.setdefault("LOADER_REMOTE_CACHE_DIR", tempfile.mkdtemp(prefix="loader-remote-test-"))

SECRET = "wJalrXUtnFEMIK7MDENGbPxRfiCYSECRETKEY9"
ACCESS = "AKIATESTREMOTESHARDS"
BUCKET = "remote-shards"


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    """A folder `tar/` and `parquet/` of real shards, 3 of each."""
    from loader.datasets import make_shards

    root = tmp_path_factory.mktemp("remote_src")
    for fmt in ("tar", "parquet"):
        out = root / fmt
        out.mkdir()
        paths = make_shards(str(out), shards=3, samples=500, fmt=fmt, progress=False)["train"]
        for path in paths:  # flatten: every shard right under tar/ or parquet/
            if os.path.dirname(path) != str(out):
                shutil.move(path, out / os.path.basename(path))
    return root


def local_shards(root, fmt: str) -> list[str]:
    """The train shards (of about equal size) of `fmt`."""
    return sorted(str(p) for p in (root / fmt).iterdir() if p.name.startswith("train-"))


class Server:
    """A ThreadingHTTPServer serving `root`; counts GETs per path and fails some with 503."""

    def __init__(self, root) -> None:
        self.requests: dict[str, int] = {}
        self.fail: dict[str, int] = {}  # path -> how many more requests answer 503
        self.lock = threading.Lock()
        server = self

        class Handler(SimpleHTTPRequestHandler):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, directory=str(root), **kwargs)

            def do_GET(self):  # noqa: N802
                path = self.path.split("?")[0]
                with server.lock:
                    server.requests[path] = server.requests.get(path, 0) + 1
                    failing = server.fail.get(path, 0)
                    if failing:
                        server.fail[path] = failing - 1
                if failing:
                    self.send_error(503, "busy")
                    return
                super().do_GET()

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def count(self, path: str) -> int:
        with self.lock:
            return self.requests.get(path, 0)

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=10)


@pytest.fixture(scope="module")
def http(shard_dir):
    server = Server(shard_dir)
    yield server
    server.close()


@pytest.fixture(autouse=True)
def settings(tmp_path, monkeypatch):
    """A fresh read cache per test, fast backoff, short timeouts."""
    monkeypatch.setenv("LOADER_REMOTE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("LOADER_REMOTE_BACKOFF_S", "0.01")
    monkeypatch.setenv("LOADER_REMOTE_BACKOFF_MAX_S", "0.05")
    monkeypatch.setenv("LOADER_REMOTE_ATTEMPTS", "4")
    monkeypatch.setenv("LOADER_REMOTE_TIMEOUT_S", "5")
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def s3(shard_dir):
    """moto's S3 server on an OS-assigned port, with every shard uploaded; yields the bucket."""
    boto3 = pytest.importorskip("boto3")
    from moto.server import ThreadedMotoServer

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AWS_ACCESS_KEY_ID", ACCESS)
        mp.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        mp.delenv("AWS_PROFILE", raising=False)
        mp.delenv("AWS_SESSION_TOKEN", raising=False)
        logging.getLogger("werkzeug").setLevel(logging.ERROR)
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        host, port = server.get_host_and_port()
        mp.setenv("AWS_ENDPOINT_URL", f"http://{host}:{port}")
        client = boto3.client("s3")
        client.create_bucket(Bucket=BUCKET)
        for fmt in ("tar", "parquet"):
            for path in local_shards(shard_dir, fmt):
                client.upload_file(path, BUCKET, f"{fmt}/{os.path.basename(path)}")
        try:
            yield mp
        finally:
            server.stop()


def assert_same(remote: str, local: str, index: int = 3) -> None:
    got, want = read_with_ids(remote, index), read_with_ids(local, index)
    assert got.error == "" and want.error == ""
    assert got.table.equals(want.table)
    np.testing.assert_array_equal(got.table["_id"].to_numpy(), make_ids(index, want.table.num_rows))


@pytest.mark.parametrize("fmt", ["tar", "parquet"])
def test_http_shards_read_as_the_local_files(shard_dir, http, fmt) -> None:
    for path in local_shards(shard_dir, fmt):
        assert_same(f"{http.url}/{fmt}/{os.path.basename(path)}", path)


@pytest.mark.parametrize("fmt", ["tar", "parquet"])
def test_s3_shards_read_as_the_local_files(shard_dir, s3, fmt) -> None:
    for path in local_shards(shard_dir, fmt):
        assert_same(f"s3://{BUCKET}/{fmt}/{os.path.basename(path)}", path)


def test_remote_globs_list_the_server(shard_dir, http, s3) -> None:
    names = [os.path.basename(p) for p in local_shards(shard_dir, "tar")]
    assert expand(f"s3://{BUCKET}/tar/train-*.tar") == [f"s3://{BUCKET}/tar/{n}" for n in names]
    assert expand(f"{http.url}/tar/train-*.tar") == [f"{http.url}/tar/{n}" for n in names]
    # Brace expansion needs no listing, and keeps URIs as written (no local absolute path).
    assert expand(f"{http.url}/tar/{{a,b}}.tar") == [f"{http.url}/tar/a.tar", f"{http.url}/tar/b.tar"]


def test_second_read_hits_the_cache(shard_dir, http) -> None:
    name = os.path.basename(local_shards(shard_dir, "tar")[0])
    url = f"{http.url}/tar/{name}"
    before = http.count(f"/tar/{name}")
    first = read_shard(url)
    assert http.count(f"/tar/{name}") == before + 1
    assert read_shard(url).equals(first)
    assert http.count(f"/tar/{name}") == before + 1  # no new request
    # The decoded-shard cache keys a remote shard by its cached copy.
    cache: ShardCache[str] = ShardCache(1 << 30)
    assert cache.put(url, 0, "decoded", 10, before=cache.identity(url, 0))
    assert cache.get(url, 0) == "decoded"


def test_cache_stays_within_its_bound_evicting_least_recently_used(shard_dir, http, settings, monkeypatch) -> None:
    paths = local_shards(shard_dir, "parquet")
    sizes = [os.path.getsize(p) for p in paths]
    bound = max(sizes[0] + sizes[1], sizes[0] + sizes[2]) + 16
    assert bound < sum(sizes)
    monkeypatch.setenv("LOADER_REMOTE_CACHE_MB", repr(bound / (1 << 20)))
    urls = [f"{http.url}/parquet/{os.path.basename(p)}" for p in paths]
    cache = FileCache.current()
    assert cache.max_bytes <= bound
    read_shard(urls[0])
    read_shard(urls[1])
    read_shard(urls[0])  # a hit: shard 0 is now the most recently used
    os.utime(cache.path(urls[1]), (1, 1))  # mtimes are the LRU order; make it unambiguous
    read_shard(urls[2])
    assert cache.bytes() <= cache.max_bytes
    kept = {os.path.basename(p) for _, _, p in cache.files()}
    assert kept == {os.path.basename(cache.path(urls[0])), os.path.basename(cache.path(urls[2]))}


def test_shard_larger_than_the_cache_is_read_and_not_kept(shard_dir, http, monkeypatch) -> None:
    monkeypatch.setenv("LOADER_REMOTE_CACHE_MB", "0.0001")
    path = local_shards(shard_dir, "tar")[0]
    assert_same(f"{http.url}/tar/{os.path.basename(path)}", path)
    assert FileCache.current().bytes() == 0


def test_404_is_quarantined_with_the_url_and_reason(http) -> None:
    url = f"{http.url}/tar/missing-000.tar"
    with pytest.raises(ShardError) as info:
        read_shard(url)
    assert info.value.uri == url and info.value.reason == "not found"
    assert http.count("/tar/missing-000.tar") == 1  # a 404 is not retried
    registry = ShardRegistry()
    (record,) = registry.add([url])
    assert not missing_at_registration(url)  # registered as pending, not "not found"
    registry.quarantine(record.index, read_with_ids(url, record.index).error)
    assert (registry.record(record.index).uri, registry.record(record.index).reason) == (url, "not found")


def test_transient_503s_are_retried(shard_dir, http) -> None:
    path = local_shards(shard_dir, "tar")[1]
    name = f"/tar/{os.path.basename(path)}"
    http.fail[name] = 2
    before = http.count(name)
    assert_same(http.url + name, path)
    assert http.count(name) == before + 3


def test_a_server_that_keeps_failing_is_given_up_after_the_bounded_attempts(shard_dir, http) -> None:
    name = f"/tar/{os.path.basename(local_shards(shard_dir, 'tar')[2])}"
    http.fail[name] = 100
    before = http.count(name)
    result = read_with_ids(http.url + name, 0)
    http.fail[name] = 0
    assert result.table is None
    assert result.error.startswith("unreachable after 4 attempts: HTTP 503")
    assert http.count(name) == before + 4


def test_a_server_that_never_answers_is_bounded(monkeypatch) -> None:
    monkeypatch.setenv("LOADER_REMOTE_TIMEOUT_S", "0.3")
    monkeypatch.setenv("LOADER_REMOTE_ATTEMPTS", "2")
    with contextlib.closing(socket.socket()) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)  # connections complete in the backlog and are never answered
        url = f"http://127.0.0.1:{listener.getsockname()[1]}/shard-000.tar"
        start = time.monotonic()
        result = read_with_ids(url, 0)
        elapsed = time.monotonic() - start
    assert result.table is None and result.error.startswith("unreachable after 2 attempts"), result.error
    assert elapsed < 20


def test_connection_refused_is_quarantined() -> None:
    with contextlib.closing(socket.socket()) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound but not listening: refused
        result = read_with_ids(f"http://127.0.0.1:{port}/x.tar", 0)
    assert result.table is None and result.error.startswith("unreachable after 4 attempts"), result.error


def test_credentials_never_appear_in_reasons_or_logs(shard_dir, http, s3, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    reasons = []
    with pytest.raises(ShardError) as info:
        read_shard(f"s3://{BUCKET}/tar/missing.tar")
    reasons += [str(info.value), info.value.reason]
    assert info.value.reason == "not found"
    # Wrong credentials: the server says so, and the reason does not repeat them.
    s3.setenv("AWS_SECRET_ACCESS_KEY", SECRET + "x")
    reasons.append(read_with_ids(f"s3://no-such-{BUCKET}/tar/a.tar", 0).error)
    s3.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    # Credentials in an http URL (user info and a signed query) are kept out of reasons and logs.
    name = f"/tar/{os.path.basename(local_shards(shard_dir, 'tar')[0])}"
    http.fail[name] = 100
    url = f"http://reader:{SECRET}@{http.url[len('http://'):]}{name}?X-Amz-Signature={SECRET}"
    with pytest.raises(ShardError) as info:
        read_shard(url)
    http.fail[name] = 0
    reasons += [str(info.value), info.value.reason]
    assert info.value.uri == http.url + name + "?<redacted>"
    ours = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("loader"))
    assert "retry" in ours
    assert ACCESS not in "\n".join(reasons) + ours  # an access key id is not secret, but
    # botocore's own debug log names it; the secret key and URL credentials appear nowhere.
    assert SECRET not in "\n".join(reasons) + "\n" + caplog.text


def test_gs_without_gcsfs_names_the_missing_package() -> None:
    try:
        import gcsfs  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("gcsfs is installed")
    result = read_with_ids("gs://some-bucket/train-000.tar", 0)
    assert result.table is None and "gcsfs" in result.error, result.error


def test_remote_uris_are_not_quarantined_at_registration() -> None:
    for uri in ["https://example.invalid/a.tar", "s3://bucket/a.parquet", "gs://bucket/a.tar"]:
        assert not missing_at_registration(uri)
        assert expand(uri) == [uri]
    assert missing_at_registration("/no/such/file.tar")


def test_service_epoch_over_http_delivers_every_sample_once(shard_dir, http, serve) -> None:
    from loader import RemoteLoader
    from tests.helpers import epoch_ids

    paths = local_shards(shard_dir, "tar")
    svc = serve([f"{http.url}/tar/{os.path.basename(p)}" for p in paths], shuffle_rows=64)
    with RemoteLoader(svc.address, job="uniform", batch_size=16, timeout_s=60) as loader:
        served = np.concatenate(epoch_ids(loader))
    expected = np.concatenate([make_ids(i, read_shard(p).num_rows) for i, p in enumerate(paths)])
    assert sorted(served.tolist()) == sorted(expected.tolist())
