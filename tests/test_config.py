"""Unit tests for `loader.config`: every rejected setting must name the key the user wrote."""

from __future__ import annotations

import pytest

from loader.config import ServiceConfig, TLSConfig, from_mapping, is_loopback, load, parse_address, read_token
from loader.errors import ConfigError

SHARDS = {"shards": ["data/train-*.tar"]}


def test_defaults() -> None:
    config = load(None, SHARDS)
    assert config == ServiceConfig(shards=("data/train-*.tar",))
    assert config.address == "127.0.0.1:50051"
    assert config.ray_address is None and config.num_cpus is None and config.state_dir is None
    assert (config.readers, config.prefetch_shards) == (2, 2)
    assert (config.shuffle_rows, config.ready_batches) == (4096, 16)
    assert config.default_policy == "uniform"
    assert config.max_message_bytes == 256 * 1024 * 1024
    assert config.hello_timeout_s == 30.0
    assert config.log_level == "INFO"


def test_yaml_file(tmp_path) -> None:
    path = tmp_path / "loader.yaml"
    path.write_text(
        "shards: [a.tar, 'b-{0..3}.tar']\n"
        "address: 0.0.0.0:7000\n"
        "readers: 4\n"
        "shuffle_rows: 0\n"
        "hello_timeout_s: 5\n"
        "log_level: debug\n"
        "state_dir: /var/lib/loader\n"
    )
    config = load(path)
    assert config.shards == ("a.tar", "b-{0..3}.tar")
    assert config.address == "0.0.0.0:7000"
    assert config.readers == 4
    assert config.shuffle_rows == 0
    assert config.hello_timeout_s == 5.0 and isinstance(config.hello_timeout_s, float)
    assert config.log_level == "DEBUG"
    assert config.state_dir == "/var/lib/loader"
    assert config.prefetch_shards == 2  # untouched keys keep their defaults


def test_single_shard_pattern_as_a_string(tmp_path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("shards: one.tar\n")
    assert load(path).shards == ("one.tar",)


def test_overrides_beat_the_file_and_none_means_unset(tmp_path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("shards: [file.tar]\nreaders: 3\nready_batches: 8\n")
    config = load(path, {"readers": 5, "ready_batches": None, "shards": None, "log_level": None})
    assert config.readers == 5
    assert config.ready_batches == 8
    assert config.shards == ("file.tar",)
    assert config.log_level == "INFO"
    assert load(path, {"shards": ["cli.tar"]}).shards == ("cli.tar",)


def test_empty_file_is_an_empty_mapping(tmp_path) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text("")
    assert load(path, SHARDS).readers == 2


def test_port_zero_is_allowed() -> None:
    assert load(None, {**SHARDS, "address": "127.0.0.1:0"}).address == "127.0.0.1:0"
    assert parse_address("127.0.0.1:0") == ("127.0.0.1", 0)
    assert parse_address("[::1]:65535") == ("[::1]", 65535)


def error_key(overrides: dict) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load(None, {**SHARDS, **overrides})
    return info.value


@pytest.mark.parametrize(
    "key, value",
    [
        ("readers", "2"),
        ("readers", True),
        ("readers", 2.5),
        ("readers", 0),
        ("readers", -1),
        ("prefetch_shards", 0),
        ("ready_batches", 0),
        ("max_message_bytes", 0),
        ("shuffle_rows", -1),
        ("shuffle_rows", False),
        ("num_cpus", 0),
        ("num_cpus", "4"),
        ("num_cpus", True),
        ("hello_timeout_s", 0),
        ("hello_timeout_s", -1.5),
        ("hello_timeout_s", float("nan")),
        ("hello_timeout_s", float("inf")),
        ("hello_timeout_s", "30"),
        ("hello_timeout_s", True),
        ("ray_address", 5),
        ("state_dir", ["a"]),
        ("address", "nohost"),
        ("address", "h:99999"),
        ("address", "h:x"),
        ("address", ":50051"),
        ("address", "h:"),
        ("address", "h:-1"),
        ("address", 50051),
        ("log_level", "verbose"),
        ("log_level", 10),
        ("default_policy", "nope"),
        ("default_policy", 3),
        ("shards", [""]),
        ("shards", ["a", 3]),
        ("shards", {"a": 1}),
    ],
)
def test_bad_values_name_their_key(key: str, value) -> None:
    error = error_key({key: value})
    assert error.key == key
    assert str(error).startswith(f"{key}: ")


def test_bool_is_not_taken_for_an_integer() -> None:
    # YAML reads `readers: yes` as True, which Python would otherwise accept as 1.
    assert "boolean" in error_key({"readers": True}).problem


def test_unknown_key_is_named() -> None:
    error = error_key({"reader": 2})
    assert error.key == "reader"
    assert "readers" in error.problem  # the known keys are listed, so the typo is easy to spot


def test_an_unknown_key_is_reported_before_other_problems(tmp_path) -> None:
    # A typo is usually the cause, and what else looks wrong may follow from it.
    assert error_key({"readers": 0, "ready_batche": 4}).key == "ready_batche"
    assert error_key({"tls": {"cert": str(tmp_path / "absent"), "key": "k", "ca": "c"}}).key == "tls.ca"


def test_a_problem_is_one_line_that_names_the_bounds() -> None:
    assert str(error_key({"readers": 0})) == "readers: must be >= 1, got 0"
    assert str(error_key({"scorer_gpus": 1.5})) == "scorer_gpus: must be in [0, 1], got 1.5"
    assert str(error_key({"hello_timeout_s": float("nan")})) == "hello_timeout_s: must be finite and > 0, got nan"
    assert str(error_key({"shards": ["a", 3]})) == "shards: item 1: expected a string, got 3"


@pytest.mark.parametrize(
    "columns, key", [({"inpt": "a"}, "columns.inpt"), ({"input": ""}, "columns.input"), ({"label": 1}, "columns.label"),
                     (["x"], "columns")],
)  # fmt: skip
def test_bad_columns_name_their_key(columns, key) -> None:
    assert error_key({"columns": columns}).key == key


def test_columns_and_selection_are_written_as_mappings() -> None:
    config = load(None, {**SHARDS, "columns": {"input": "image"}, "selection": {"keep_ratio": 0.5}})
    assert config.columns == (("input", "image"), ("label", "y")) and config.input_column == "image"
    assert config.selection.keep_ratio == 0.5 and config.selection.selector == "topk"
    assert error_key({"selection": {"keep_ratio": 2}}).key == "selection.keep_ratio"


def test_unknown_policy_lists_the_known_ones() -> None:
    assert "uniform" in error_key({"default_policy": "nope"}).problem


def test_empty_shard_list_is_refused() -> None:
    assert error_key({"shards": []}).key == "shards"


def test_missing_shards_is_refused(tmp_path) -> None:
    with pytest.raises(ConfigError) as info:
        load(None)
    assert info.value.key == "shards"
    path = tmp_path / "c.yaml"
    path.write_text("readers: 3\n")
    with pytest.raises(ConfigError) as info:
        load(path)
    assert info.value.key == "shards"


def test_missing_file(tmp_path) -> None:
    path = tmp_path / "absent.yaml"
    with pytest.raises(ConfigError) as info:
        load(path, SHARDS)
    assert info.value.key == "--config"
    assert str(path) in info.value.problem


def test_invalid_yaml(tmp_path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("shards: [a.tar\nreaders: 2\n")
    with pytest.raises(ConfigError) as info:
        load(path)
    assert info.value.key == "--config"
    assert "YAML" in info.value.problem


def test_yaml_list_is_not_a_mapping(tmp_path) -> None:
    path = tmp_path / "list.yaml"
    path.write_text("- shards\n- readers\n")
    with pytest.raises(ConfigError) as info:
        load(path)
    assert info.value.key == "--config"
    assert "mapping" in info.value.problem


def test_errors_in_the_file_name_the_key(tmp_path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("shards: [a.tar]\nready_batches: -3\n")
    with pytest.raises(ConfigError) as info:
        load(path)
    assert info.value.key == "ready_batches"


def test_from_mapping_rejects_a_non_mapping() -> None:
    with pytest.raises(ConfigError) as info:
        from_mapping(["shards"], source="env")  # type: ignore[arg-type]
    assert info.value.key == "env"


# -- token and TLS ---------------------------------------------------------------------------------

PEM = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"


@pytest.fixture
def pem_files(tmp_path):
    paths = {}
    for name in ("cert", "key", "client_ca"):
        paths[name] = tmp_path / f"{name}.pem"
        paths[name].write_text(PEM)
    return {name: str(path) for name, path in paths.items()}


def test_no_token_and_no_tls_by_default() -> None:
    config = load(None, SHARDS)
    assert config.token_file is None and config.tls is None
    assert read_token(config, environ={}) is None


def test_token_file_is_read_stripped_and_kept_out_of_the_config(tmp_path) -> None:
    path = tmp_path / "token"
    path.write_text("  s3cret-value\n")
    config = load(None, {**SHARDS, "token_file": str(path)})
    assert config.token_file == str(path)
    assert "s3cret-value" not in repr(config)  # only the path travels (to actors, into logs)
    assert read_token(config, environ={}) == "s3cret-value"


def test_token_file_beats_the_environment(tmp_path) -> None:
    path = tmp_path / "token"
    path.write_text("from-file")
    config = load(None, {**SHARDS, "token_file": str(path)})
    assert read_token(config, environ={"LOADER_TOKEN": "from-env"}) == "from-file"


def test_token_from_the_environment() -> None:
    config = load(None, SHARDS)
    assert read_token(config, environ={"LOADER_TOKEN": " from-env\n"}) == "from-env"


@pytest.mark.parametrize("value", ["", "   ", "two words"])
def test_unusable_token_in_the_environment_is_refused(value) -> None:
    with pytest.raises(ConfigError) as info:
        read_token(load(None, SHARDS), environ={"LOADER_TOKEN": value})
    assert info.value.key == "$LOADER_TOKEN"
    if value.strip():
        assert value not in str(info.value)  # a secret is never echoed


@pytest.mark.parametrize("content", [b"", b"\n  \n", b"has space", "t\u00f6ken".encode()])
def test_unusable_token_file_names_the_key_without_echoing_it(tmp_path, content) -> None:
    path = tmp_path / "token"
    path.write_bytes(content)
    error = error_key({"token_file": str(path)})
    assert error.key == "token_file"
    if content.strip():
        assert content.decode() not in str(error)


def test_missing_token_file_or_a_directory_names_the_key(tmp_path) -> None:
    error = error_key({"token_file": str(tmp_path / "absent")})
    assert error.key == "token_file" and "not found" in error.problem
    assert error_key({"token_file": str(tmp_path)}).key == "token_file"
    assert error_key({"token_file": 7}).key == "token_file"


def test_tls_mapping(pem_files) -> None:
    config = load(None, {**SHARDS, "tls": pem_files})
    assert config.tls == TLSConfig(cert=pem_files["cert"], key=pem_files["key"], client_ca=pem_files["client_ca"])
    one_way = load(None, {**SHARDS, "tls": {"cert": pem_files["cert"], "key": pem_files["key"]}})
    assert one_way.tls.client_ca is None


def test_tls_in_a_yaml_file(tmp_path, pem_files) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(f"shards: [a.tar]\ntls:\n  cert: {pem_files['cert']}\n  key: {pem_files['key']}\n")
    assert load(path).tls.cert == pem_files["cert"]


@pytest.mark.parametrize(
    "change, key",
    [
        ({"cert": None}, "tls.cert"),
        ({"key": None}, "tls.key"),
        ({"cert": "/no/such/cert.pem"}, "tls.cert"),
        ({"client_ca": "/no/such/ca.pem"}, "tls.client_ca"),
        ({"key": ""}, "tls.key"),
        ({"key": 5}, "tls.key"),
        ({"ca": "x"}, "tls.ca"),
    ],
)
def test_bad_tls_settings_name_their_key(pem_files, change, key) -> None:
    tls = {k: v for k, v in {**pem_files, **change}.items() if v is not None}
    assert error_key({"tls": tls}).key == key


def test_tls_must_be_a_mapping_of_pem_files(tmp_path, pem_files) -> None:
    assert error_key({"tls": "on"}).key == "tls"
    not_pem = tmp_path / "key.der"
    not_pem.write_bytes(b"\x30\x82\x01\x0a")
    error = error_key({"tls": {**pem_files, "key": str(not_pem)}})
    assert error.key == "tls.key" and "PEM" in error.problem


@pytest.mark.parametrize(
    "address, loopback",
    [("127.0.0.1:1", True), ("127.8.0.2:1", True), ("localhost:50051", True), ("[::1]:1", True),
     ("unix:/tmp/s", True), ("0.0.0.0:50051", False), ("10.0.0.1:1", False), ("loader.svc:50051", False)],
)  # fmt: skip
def test_is_loopback(address, loopback) -> None:
    assert is_loopback(address) is loopback
