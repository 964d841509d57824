"""Bearer token and TLS end to end: real gateways on 127.0.0.1 over one pipeline, real certificates."""

from __future__ import annotations

import logging
import os
import warnings

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from loader import RemoteLoader
from loader.cli import main as cli_main
from loader.client import TLS, InsecureTokenWarning
from loader.client.admin import ServiceCallError, fetch_stats
from loader.config import from_mapping
from loader.errors import ConfigError
from loader.gateway.auth import token_problem
from loader.gateway.server import BackgroundGateway, Gateway
from loader.v1 import loader_pb2 as pb
from loader.v1 import loader_pb2_grpc as pb_grpc
from tests import certs
from tests.helpers import epoch_ids, rows_in

# Distinctive, so finding it in a log or an error message cannot be a coincidence.
TOKEN = "tok-3f9a1c7e5b2d4860-test"
CALL_TIMEOUT_S = 30
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED


@pytest.fixture(scope="module", autouse=True)
def no_ambient_token():
    # A developer's own $LOADER_TOKEN must not decide which calls carry a token here.
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("LOADER_TOKEN", raising=False)
        yield


@pytest.fixture(scope="module")
def shards(mnist_tar):
    return mnist_tar["train"][:2]


@pytest.fixture(scope="module")
def open_service(serve, shards):
    """The shared pipeline, behind a gateway with no token and no TLS."""
    return serve(shards, readers=1, shuffle_rows=16)


@pytest.fixture(scope="module")
def token_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("secret") / "token"
    path.write_text(TOKEN + "\n")  # the trailing newline an editor or `echo` leaves is stripped
    path.chmod(0o600)
    return path


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    directory = tmp_path_factory.mktemp("pki")
    ca, rogue = certs.make_ca(directory, "loader-test-ca"), certs.make_ca(directory, "rogue-ca")
    return {
        "ca": ca,
        "server": certs.issue(ca, directory, "server", server=True),
        "client": certs.issue(ca, directory, "trainer", server=False),
        "rogue_client": certs.issue(rogue, directory, "intruder", server=False),
        "rogue_ca": rogue,
    }


@pytest.fixture(scope="module")
def gateway(open_service, shards):
    """Starts more gateways on the shared pipeline, each with its own security settings."""
    running: list[BackgroundGateway] = []

    def start(**settings) -> str:
        config = from_mapping({"shards": list(shards), "address": "127.0.0.1:0", **settings})
        background = BackgroundGateway(open_service.pipeline, config)
        running.append(background)
        return background.start()

    yield start
    for background in running:
        background.stop()


@pytest.fixture(scope="module")
def token_address(gateway, token_path):
    return gateway(token_file=str(token_path))


@pytest.fixture(scope="module")
def tls_address(gateway, token_path, pki):
    return gateway(token_file=str(token_path), tls={"cert": pki["server"].cert, "key": pki["server"].key})


@pytest.fixture(scope="module")
def mtls_address(gateway, pki):
    tls = {"cert": pki["server"].cert, "key": pki["server"].key, "client_ca": pki["ca"].cert}
    return gateway(tls=tls)


def bearer(token: str) -> tuple:
    return (("authorization", f"Bearer {token}"),)


def code_of(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code()


# -- the five kinds of RPC, raw, so a test chooses exactly what metadata is sent --------------------


def call_train(channel, metadata):
    # batch_size 0 is refused on its merits, so a call that gets past auth starts no job.
    hello = pb.Hello(job="auth-probe", rank=0, world_size=1, batch_size=0)
    requests = iter([pb.TrainRequest(hello=hello), pb.TrainRequest(credit=pb.Credit(batches=1))])
    return next(iter(pb_grpc.LoaderStub(channel).Train(requests, metadata=metadata, timeout=CALL_TIMEOUT_S)))


def call_get_stats(channel, metadata):
    return pb_grpc.LoaderStub(channel).GetStats(pb.GetStatsRequest(), metadata=metadata, timeout=CALL_TIMEOUT_S)


def call_add_shards(channel, metadata, uris=("nothing-matches-this-*.tar",)):
    request = pb.AddShardsRequest(uris=list(uris))
    return pb_grpc.LoaderStub(channel).AddShards(request, metadata=metadata, timeout=CALL_TIMEOUT_S)


def call_push_weights(channel, metadata):
    chunks = iter([pb.WeightsChunk(job="no-such-job", step=1, data=b"not a state dict")])
    return pb_grpc.LoaderStub(channel).PushWeights(chunks, metadata=metadata, timeout=CALL_TIMEOUT_S)


def call_reflection(channel, metadata):
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    requests = iter([reflection_pb2.ServerReflectionRequest(list_services="")])
    return next(iter(stub.ServerReflectionInfo(requests, metadata=metadata, timeout=CALL_TIMEOUT_S)))


def health(channel, metadata=()):
    stub = health_pb2_grpc.HealthStub(channel)
    return stub.Check(health_pb2.HealthCheckRequest(service=""), metadata=metadata, timeout=CALL_TIMEOUT_S).status


RPCS = {
    "Train": call_train,
    "GetStats": call_get_stats,
    "AddShards": call_add_shards,
    "PushWeights": call_push_weights,
    "reflection": call_reflection,
}
BAD_CREDENTIALS = {
    "missing": (),
    "wrong": bearer("not-the-token"),
    "prefix-of-token": bearer(TOKEN[:-1]),
    "token-plus-suffix": bearer(TOKEN + "x"),
    "other-scheme": (("authorization", f"Basic {TOKEN}"),),
    "scheme-only": (("authorization", "Bearer "),),
}


# -- bearer token ----------------------------------------------------------------------------------


def pool_uris(stats: pb.Stats) -> list[str]:
    return sorted(s.uri for s in stats.shards)


def test_no_token_configured_means_no_auth(open_service, shards):
    stats = fetch_stats(open_service.address, timeout_s=CALL_TIMEOUT_S)
    assert pool_uris(stats) == sorted(os.path.abspath(p) for p in shards)


@pytest.mark.parametrize("rpc", sorted(RPCS))
@pytest.mark.parametrize("credentials", sorted(BAD_CREDENTIALS))
def test_every_rpc_without_the_right_token_is_unauthenticated(token_address, rpc, credentials):
    with grpc.insecure_channel(token_address) as channel:
        with pytest.raises(grpc.RpcError) as info:
            RPCS[rpc](channel, BAD_CREDENTIALS[credentials])
    assert info.value.code() == UNAUTHENTICATED
    assert TOKEN not in (info.value.details() or "")


@pytest.mark.parametrize("rpc", sorted(RPCS))
def test_every_rpc_with_the_token_gets_past_auth(token_address, rpc, shards):
    with grpc.insecure_channel(token_address) as channel:
        if rpc in ("AddShards", "PushWeights", "Train"):
            # These probes send requests the service rejects on their merits: proof they got in.
            code = code_of(lambda: RPCS[rpc](channel, bearer(TOKEN)))
            assert code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION)
        elif rpc == "reflection":
            names = {s.name for s in call_reflection(channel, bearer(TOKEN)).list_services_response.service}
            assert "loader.v1.Loader" in names
        else:
            assert pool_uris(call_get_stats(channel, bearer(TOKEN))) == sorted(os.path.abspath(p) for p in shards)


def test_bearer_scheme_is_case_insensitive(token_address):
    with grpc.insecure_channel(token_address) as channel:
        assert len(call_get_stats(channel, (("authorization", f"bearer {TOKEN}"),)).shards) == 2


def test_rejected_add_shards_changes_nothing(token_address, mnist_tar):
    outsider = mnist_tar["train"][4]
    with grpc.insecure_channel(token_address) as channel:
        assert code_of(lambda: call_add_shards(channel, bearer("nope"), uris=[outsider])) == UNAUTHENTICATED
        uris = {s.uri for s in call_get_stats(channel, bearer(TOKEN)).shards}
    assert not any(uri.endswith(outsider.rsplit("/", 1)[-1]) for uri in uris)


def watched_until_serving(channel, metadata=()) -> int:
    """The first status Watch reports that is SERVING, or the last one before the stream ends: a
    gateway that has just started says NOT_SERVING until its pipeline's actors answer."""
    stub = health_pb2_grpc.HealthStub(channel)
    status = None
    for reply in stub.Watch(health_pb2.HealthCheckRequest(service=""), metadata=metadata, timeout=CALL_TIMEOUT_S):
        status = reply.status
        if status == health_pb2.HealthCheckResponse.SERVING:
            break
    return status


def test_health_needs_no_token(token_address):
    with grpc.insecure_channel(token_address) as channel:
        assert watched_until_serving(channel) == health_pb2.HealthCheckResponse.SERVING
        assert health(channel) == health_pb2.HealthCheckResponse.SERVING
        assert health(channel, bearer("whatever")) == health_pb2.HealthCheckResponse.SERVING


def test_remote_loader_with_the_token_trains_a_full_epoch(token_address, shards):
    with RemoteLoader(token_address, job="auth-token-epoch", batch_size=50, token=TOKEN, timeout_s=120) as loader:
        ids = epoch_ids(loader)
        assert [j.job for j in loader.stats().jobs] == ["auth-token-epoch"]
    assert sum(len(i) for i in ids) == rows_in(shards)


def test_remote_loader_takes_the_token_from_the_environment(token_address, monkeypatch):
    monkeypatch.setenv("LOADER_TOKEN", TOKEN)
    with RemoteLoader(token_address, job="auth-env", batch_size=50, timeout_s=120) as loader:
        assert len(loader.stats().shards) == 2  # the loader's own calls carry it, streams included
    assert len(fetch_stats(token_address, timeout_s=CALL_TIMEOUT_S).shards) == 2


@pytest.mark.parametrize("token", [None, "wrong"])
def test_remote_loader_without_the_right_token_is_unauthenticated(token_address, token):
    with RemoteLoader(token_address, job="auth-refused", batch_size=50, token=token, timeout_s=60) as loader:
        assert code_of(lambda: next(iter(loader))) == UNAUTHENTICATED
        assert code_of(loader.stats) == UNAUTHENTICATED
    with pytest.raises(ServiceCallError) as info:
        fetch_stats(token_address, token=token, timeout_s=CALL_TIMEOUT_S)
    assert info.value.code == "UNAUTHENTICATED"


def test_token_never_reaches_the_logs(caplog, open_service, shards, token_path):
    caplog.set_level(logging.DEBUG)
    config = from_mapping({"shards": list(shards), "address": "127.0.0.1:0", "token_file": str(token_path)})
    background = BackgroundGateway(open_service.pipeline, config)
    address = background.start()
    try:
        with grpc.insecure_channel(address) as channel:
            for credentials in BAD_CREDENTIALS.values():
                assert code_of(lambda: call_get_stats(channel, credentials)) == UNAUTHENTICATED
            call_get_stats(channel, bearer(TOKEN))
    finally:
        background.stop()
    assert "auth: bearer token required" in caplog.text
    assert "refused /loader.v1.Loader/GetStats: wrong token" in caplog.text  # the log was captured at all
    assert TOKEN not in caplog.text
    assert TOKEN not in repr(config)


def test_start_up_says_when_anyone_can_read_the_data(caplog, open_service, shards):
    caplog.set_level(logging.INFO, logger="loader.gateway")
    background = BackgroundGateway(open_service.pipeline, from_mapping({"shards": list(shards), "address": "127.0.0.1:0"}))
    address = background.start()
    background.stop()
    warnings_ = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert f"auth: none — anyone who can reach {address} can read the data" in warnings_


def test_blank_token_in_the_environment_refuses_to_start(open_service, shards, monkeypatch):
    monkeypatch.setenv("LOADER_TOKEN", "  ")
    with pytest.raises(ConfigError) as info:
        Gateway(open_service.pipeline, from_mapping({"shards": list(shards), "address": "127.0.0.1:0"}))
    assert info.value.key == "$LOADER_TOKEN"


def test_stats_verb_takes_a_token_file(token_address, token_path, tmp_path, capsys):
    assert cli_main(["stats", "--address", token_address, "--token-file", str(token_path)]) == 0
    assert '"shards"' in capsys.readouterr().out
    wrong = tmp_path / "wrong"
    wrong.write_text("not-the-token\n")
    assert cli_main(["stats", "--address", token_address, "--token-file", str(wrong)]) == 1
    assert "UNAUTHENTICATED" in capsys.readouterr().err
    assert cli_main(["stats", "--address", token_address, "--token-file", str(tmp_path / "absent")]) == 2
    assert "--token-file" in capsys.readouterr().err


# -- TLS -------------------------------------------------------------------------------------------


def test_tls_client_trusting_the_ca_trains_a_full_epoch(tls_address, pki, shards):
    tls = TLS(ca=pki["ca"].cert)
    with RemoteLoader(tls_address, job="auth-tls-epoch", batch_size=50, token=TOKEN, tls=tls, timeout_s=120) as loader:
        ids = epoch_ids(loader)
    assert sum(len(i) for i in ids) == rows_in(shards)
    stats = fetch_stats(tls_address, token=TOKEN, tls={"ca": pki["ca"].cert}, timeout_s=CALL_TIMEOUT_S)
    assert pool_uris(stats) == sorted(os.path.abspath(p) for p in shards)


def test_tls_server_still_requires_the_token(tls_address, pki):
    with pytest.raises(ServiceCallError) as info:
        fetch_stats(tls_address, tls=TLS(ca=pki["ca"].cert), timeout_s=CALL_TIMEOUT_S)
    assert info.value.code == "UNAUTHENTICATED"


def test_plaintext_client_cannot_talk_to_a_tls_server(tls_address):
    with grpc.insecure_channel(tls_address) as channel:
        assert code_of(lambda: call_get_stats(channel, bearer(TOKEN))) == grpc.StatusCode.UNAVAILABLE
        assert code_of(lambda: health(channel)) == grpc.StatusCode.UNAVAILABLE


def test_client_that_trusts_another_ca_refuses_the_server(tls_address, pki):
    with pytest.raises(ServiceCallError) as info:
        fetch_stats(tls_address, token=TOKEN, tls=TLS(ca=pki["rogue_ca"].cert), timeout_s=CALL_TIMEOUT_S)
    assert info.value.code == "UNAVAILABLE"


def test_server_name_decides_which_name_the_certificate_must_carry(tls_address, pki):
    ca = pki["ca"].cert
    stats = fetch_stats(tls_address, token=TOKEN, tls=TLS(ca=ca, server_name="localhost"), timeout_s=CALL_TIMEOUT_S)
    assert len(stats.shards) == 2
    with pytest.raises(ServiceCallError) as info:
        fetch_stats(tls_address, token=TOKEN, tls=TLS(ca=ca, server_name="elsewhere.example"), timeout_s=CALL_TIMEOUT_S)
    assert info.value.code == "UNAVAILABLE"


def test_mutual_tls_client_with_a_certificate_from_the_ca_trains(mtls_address, pki, shards):
    tls = TLS(ca=pki["ca"].cert, cert=pki["client"].cert, key=pki["client"].key)
    with RemoteLoader(mtls_address, job="auth-mtls-epoch", batch_size=50, tls=tls, timeout_s=120) as loader:
        ids = epoch_ids(loader)
    assert sum(len(i) for i in ids) == rows_in(shards)


@pytest.mark.parametrize("client", ["none", "rogue_client"])
def test_mutual_tls_refuses_clients_without_a_certificate_from_the_ca(mtls_address, pki, client):
    tls = TLS(ca=pki["ca"].cert)
    if client != "none":
        tls = TLS(ca=pki["ca"].cert, cert=pki[client].cert, key=pki[client].key)
    with pytest.raises(ServiceCallError) as info:
        fetch_stats(mtls_address, tls=tls, timeout_s=CALL_TIMEOUT_S)
    assert info.value.code == "UNAVAILABLE"
    # A refused handshake reaches the client as UNAVAILABLE, as a service that is down does, so
    # the loader would retry it for reconnect_s; 0 asks for the error at once.
    with RemoteLoader(mtls_address, job="auth-mtls-refused", batch_size=50, tls=tls, timeout_s=60,
                      reconnect_s=0) as loader:  # fmt: skip
        assert code_of(lambda: next(iter(loader))) == grpc.StatusCode.UNAVAILABLE


def test_stats_verb_speaks_mutual_tls(mtls_address, pki, capsys):
    flags = ["--tls-ca", pki["ca"].cert, "--tls-cert", pki["client"].cert, "--tls-key", pki["client"].key]
    assert cli_main(["stats", "--address", mtls_address, *flags]) == 0
    assert '"shards"' in capsys.readouterr().out
    assert cli_main(["stats", "--address", mtls_address, "--tls-ca", pki["ca"].cert]) == 1
    assert "UNAVAILABLE" in capsys.readouterr().err
    assert cli_main(["stats", "--address", mtls_address, "--tls-cert", pki["client"].cert]) == 2
    assert "--tls-key" in capsys.readouterr().err


# -- client-side checks (no server needed) ----------------------------------------------------------


def test_token_over_plaintext_to_another_host_warns():
    with pytest.warns(InsecureTokenWarning, match="without TLS"):
        RemoteLoader("10.255.0.1:50051", job="j", batch_size=1, token="t").close()


@pytest.mark.parametrize(
    "address, token, tls",
    [("127.0.0.1:50051", "t", None), ("localhost:50051", "t", None), ("[::1]:50051", "t", None),
     ("10.255.0.1:50051", None, None), ("10.255.0.1:50051", "t", True)],
)  # fmt: skip
def test_no_warning_on_loopback_without_a_token_or_with_tls(address, token, tls):
    with warnings.catch_warnings():
        warnings.simplefilter("error", InsecureTokenWarning)
        RemoteLoader(address, job="j", batch_size=1, token=token, tls=tls).close()


def test_client_tls_settings_are_checked(tmp_path):
    with pytest.raises(ValueError, match="cert and key go together"):
        TLS(cert="client.crt")
    with pytest.raises(ValueError, match="tls.cafile: unknown key"):
        RemoteLoader("127.0.0.1:1", job="j", batch_size=1, tls={"cafile": "x"})
    with pytest.raises(ValueError, match="tls.ca: cannot read"):
        RemoteLoader("127.0.0.1:1", job="j", batch_size=1, tls=TLS(ca=str(tmp_path / "absent.pem")))


def test_client_refuses_a_token_that_cannot_be_a_header_without_echoing_it():
    with pytest.raises(ValueError) as info:
        RemoteLoader("127.0.0.1:1", job="j", batch_size=1, token="two words")
    assert "two words" not in str(info.value)


@pytest.mark.parametrize(
    "metadata, problem",
    [
        ((), "missing"),
        ((("authorization", "Bearer a"), ("authorization", "Bearer a")), "more than one"),
        ((("authorization", b"Bearer a"),), "must be text"),
        ((("authorization", "Token a"),), "must read `Bearer <token>`"),
        ((("authorization", "Bearer b"),), "wrong token"),
        ((("x-other", "Bearer a"),), "missing"),
    ],
)
def test_token_problem_names_what_is_wrong(metadata, problem):
    assert problem in token_problem(metadata, "a")
    assert token_problem((("authorization", "BEARER a"),), "a") is None
