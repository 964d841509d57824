"""`pipe:COMMAND` shards (off unless allowed) and the config's `remote` keys, which a service
hands to every process that reads shards."""

from __future__ import annotations

import shlex

import numpy as np
import pytest

from loader.config import from_mapping
from loader.errors import ConfigError, ShardError
from loader.reader import read_with_ids
from loader.registry import missing_at_registration
from loader.sources import expand, read_shard, remote_settings
from loader.sources.file_cache import FileCache
from loader.sources.remote import RetryPolicy
from loader.sources.remote_settings import RemoteSettings
from loader.sources.writers import write_parquet, write_tar


@pytest.fixture(autouse=True)
def settings(tmp_path, monkeypatch):
    for name in ("CACHE_DIR", "CACHE_MB", "ATTEMPTS", "BACKOFF_S", "BACKOFF_MAX_S", "TIMEOUT_S", "ALLOW_PIPE"):
        monkeypatch.delenv("LOADER_REMOTE_" + name, raising=False)
    remote_settings.configure(RemoteSettings(cache_dir=str(tmp_path / "cache"), allow_pipe=True))
    yield
    remote_settings.configure(None)


@pytest.fixture
def shards(tmp_path):
    x = np.arange(30, dtype=np.float32).reshape(10, 3)
    tar, parquet = str(tmp_path / "a.tar"), str(tmp_path / "a.parquet")
    write_tar(tar, [{"x": x[i], "y": i} for i in range(10)])
    write_parquet(parquet, {"x": x, "y": np.arange(10)})
    return tar, parquet


def test_pipe_reads_what_the_command_writes(shards) -> None:
    tar, parquet = shards
    for path in (tar, parquet):
        uri = f"pipe:cat {shlex.quote(path)}"
        assert read_shard(uri).equals(read_shard(path))
    assert not missing_at_registration(f"pipe:cat {tar}")
    assert expand(f"pipe:cat {tar[:-5]}{{a,b}}.tar") == [f"pipe:cat {tar[:-5]}a.tar", f"pipe:cat {tar[:-5]}b.tar"]


def test_pipe_is_refused_unless_allowed_even_when_cached(shards, tmp_path) -> None:
    tar, _ = shards
    uri = f"pipe:cat {tar}"
    read_shard(uri)  # cached while allowed
    remote_settings.configure(RemoteSettings(cache_dir=str(tmp_path / "cache")))
    result = read_with_ids(uri, 0)
    assert result.table is None and "allow_pipe: true" in result.error


def test_a_failing_command_is_a_named_reason(tmp_path) -> None:
    marker = tmp_path / "ran"
    result = read_with_ids(f"pipe:touch {marker}; exit 3", 0)
    assert marker.exists()  # the command ran, once
    assert result.table is None and "pipe: command failed" in result.error and "exit 3" in result.error
    assert "empty pipe: command" in read_with_ids("pipe:  ", 1).error


def test_config_remote_keys_win_over_the_environment(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("LOADER_REMOTE_ATTEMPTS", "9")
    monkeypatch.setenv("LOADER_REMOTE_TIMEOUT_S", "4")
    config = from_mapping({"shards": ["a.tar"], "remote": {"attempts": 2, "cache_mb": 1, "cache_dir": str(tmp_path)}})
    settings = config.remote.settings()
    assert (settings.attempts, settings.timeout_s, settings.cache_mb, settings.allow_pipe) == (2, 4.0, 1, False)
    remote_settings.configure(settings)
    assert RetryPolicy.current().attempts == 2 and RetryPolicy.current().timeout_s == 4.0
    assert FileCache.current().max_bytes == 1 << 20 and FileCache.current().folder == str(tmp_path)


@pytest.mark.parametrize("remote, key", [
    ({"attempts": 0}, "remote.attempts"),
    ({"allow_pipe": "yes"}, "remote.allow_pipe"),
    ({"cache_mb": -1}, "remote.cache_mb"),
    ({"retries": 3}, "remote.retries"),
])  # fmt: skip
def test_bad_remote_keys_name_the_key(remote, key) -> None:
    with pytest.raises(ConfigError) as caught:
        from_mapping({"shards": ["a.tar"], "remote": remote})
    assert caught.value.key == key


def test_a_bad_environment_value_names_the_variable(monkeypatch) -> None:
    monkeypatch.setenv("LOADER_REMOTE_ATTEMPTS", "many")
    with pytest.raises(ConfigError) as caught:
        RemoteSettings.from_env()
    assert caught.value.key == "LOADER_REMOTE_ATTEMPTS"


def test_unreadable_pipe_output_names_the_command_not_the_cache(tmp_path) -> None:
    with pytest.raises(ShardError) as caught:
        read_shard("pipe:echo not a tar")
    assert caught.value.uri == "pipe:echo not a tar" and str(tmp_path / "cache") not in caught.value.reason
