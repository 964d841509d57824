"""The Kubernetes manifests in k8s/ and the image recipes in docker/: valid against the API's own
schemas, and wired to each other and to the service the way the service actually behaves.

Nothing here talks to a cluster. Core objects, and every pod template inside the RayCluster, go
through `kubernetes-validate` in strict mode (unknown fields are errors). The RayCluster goes
through KubeRay's CRD schema from ../shared/k8s-schemas/, closed the same way; that folder sits
beside the checkout here and in CI but not in a user's clone, where those tests skip.
"""

from __future__ import annotations

import copy
import fnmatch
import functools
import json
import re
import shlex
import os
import shutil
import signal
import subprocess
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from loader import config as config_mod
from loader.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
DOCKER = ROOT / "docker"
SCHEMAS = ROOT.parent / "shared" / "k8s-schemas"
CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml"}
# The oldest Kubernetes with everything the manifests use (gRPC readiness probes are GA from
# 1.27), and the newest that kubernetes-validate knows.
K8S_VERSIONS = ("1.27", kubernetes_validate.latest_version())


# --- reading the manifests ----------------------------------------------------------------------


def _documents() -> dict[str, list[dict]]:
    docs = {}
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        docs[path.name] = [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]
    return docs


def _objects() -> list[dict]:
    return [obj for objs in _documents().values() for obj in objs]


def _one(kind: str, name: str | None = None) -> dict:
    found = [o for o in _objects() if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''} in k8s/, found {len(found)}"
    return found[0]


def _is_ray(obj: dict) -> bool:
    return obj["apiVersion"].startswith("ray.io/")


def _core_objects() -> list[dict]:
    return [o for o in _objects() if not _is_ray(o)]


def _ray_templates(cluster: dict) -> dict[str, dict]:
    """Group name ("head" for the head) -> pod template, for a RayCluster."""
    spec = cluster["spec"]
    templates = {"head": spec["headGroupSpec"]["template"]}
    for group in spec.get("workerGroupSpecs", []):
        templates[group["groupName"]] = group["template"]
    return templates


def _worker_group(cluster: dict, name: str) -> dict:
    (group,) = [g for g in cluster["spec"]["workerGroupSpecs"] if g["groupName"] == name]
    return group


def _as_pod_template(template: dict, name: str) -> dict:
    # A RayCluster's group template is a PodTemplateSpec; the core PodTemplate object wraps one.
    return {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": name}, "template": template}


def _cluster() -> dict:
    return _one("RayCluster")


def _head_container() -> dict:
    return _cluster()["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]


def _service_config() -> dict:
    return yaml.safe_load(_one("ConfigMap", "loader-config")["data"]["config.yaml"])


def _gateway_service() -> dict:
    return _one("Service", "loader-gateway")


def _mount_of(template: dict, container: dict, predicate) -> str:
    """The mountPath, in `container`, of the one volume of `template` that `predicate` accepts."""
    names = [v["name"] for v in template["spec"].get("volumes", []) if predicate(v)]
    assert len(names) == 1, f"expected one such volume, found {names}"
    paths = [m["mountPath"] for m in container.get("volumeMounts", []) if m["name"] == names[0]]
    assert len(paths) == 1, f"volume {names[0]} is not mounted once in container {container['name']}"
    return paths[0]


def _claim(name: str):
    return lambda volume: volume.get("persistentVolumeClaim", {}).get("claimName") == name


def _secret(name: str):
    return lambda volume: volume.get("secret", {}).get("secretName") == name


def _config_map(name: str):
    return lambda volume: volume.get("configMap", {}).get("name") == name


def _under(path: str, directory: str) -> bool:
    return Path(path).is_relative_to(directory)


# --- schema validation --------------------------------------------------------------------------


def _core_validate(obj: dict, version: str) -> None:
    kubernetes_validate.validate(obj, version, strict=True)


def _closed(schema):
    """The CRD schema with unknown fields rejected, as the API server prunes-and-rejects them:
    every object schema that lists its properties and neither sets additionalProperties nor
    preserves unknown fields gets `additionalProperties: false`."""
    if isinstance(schema, dict):
        if (
            schema.get("type") == "object"
            and isinstance(schema.get("properties"), dict)
            and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")
        ):
            schema["additionalProperties"] = False
        for value in schema.values():
            _closed(value)
    elif isinstance(schema, list):
        for item in schema:
            _closed(item)
    return schema


# libyaml when PyYAML has it: the CRD files are 1-2 MB, several seconds each in pure Python.
_FAST_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


@functools.cache
def _closed_crd_schema(kind: str) -> dict:
    crd = yaml.load((SCHEMAS / CRD_FILES[kind]).read_text(), Loader=_FAST_LOADER)
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return _closed(v1["schema"]["openAPIV3Schema"])


def _crd_validator(kind: str) -> jsonschema.protocols.Validator:
    path = SCHEMAS / CRD_FILES[kind]
    if not path.is_file():
        pytest.skip(
            f"KubeRay CRD schemas not found: {path} (the folder ../shared/k8s-schemas/ beside the "
            "checkout holds them in CI; a plain clone has no such folder)"
        )
    return jsonschema.Draft202012Validator(_closed_crd_schema(kind))


def _crd_errors(obj: dict) -> list[str]:
    errors = _crd_validator(obj["kind"]).iter_errors(obj)
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in errors]


def _with_typo(template: dict) -> dict:
    broken = copy.deepcopy(template)
    broken["spec"]["contaners"] = broken["spec"].pop("containers")
    return broken


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_core_objects_validate_strictly(version):
    objects = _core_objects()
    assert {o["kind"] for o in objects} >= {"Service", "ConfigMap", "Secret", "Job", "PersistentVolumeClaim"}
    for obj in objects:
        _core_validate(obj, version)


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_ray_pod_templates_validate_strictly(version):
    templates = _ray_templates(_cluster())
    assert set(templates) == {"head", "readers", "scorers"}
    for group, template in templates.items():
        _core_validate(_as_pod_template(template, f"loader-{group}"), version)


def test_ray_resources_validate_against_the_kuberay_crds():
    ray_objects = [o for o in _objects() if _is_ray(o)]
    assert [o["kind"] for o in ray_objects] == ["RayCluster"]
    for obj in ray_objects:
        assert obj["apiVersion"] == "ray.io/v1"
        assert _crd_errors(obj) == []


def test_core_validator_rejects_a_field_name_typo():
    head = _cluster()["spec"]["headGroupSpec"]["template"]
    _core_validate(_as_pod_template(head, "loader-head"), K8S_VERSIONS[-1])  # the intact one passes
    with pytest.raises(kubernetes_validate.ValidationError):
        _core_validate(_as_pod_template(_with_typo(head), "loader-head"), K8S_VERSIONS[-1])
    service = copy.deepcopy(_gateway_service())
    service["spec"]["selecter"] = service["spec"].pop("selector")
    with pytest.raises(kubernetes_validate.ValidationError):
        _core_validate(service, K8S_VERSIONS[-1])


def test_crd_validator_rejects_a_field_name_typo():
    cluster = _cluster()
    broken = copy.deepcopy(cluster)
    broken["spec"]["headGroupSpec"]["template"] = _with_typo(cluster["spec"]["headGroupSpec"]["template"])
    assert any("contaners" in e for e in _crd_errors(broken))
    # A field of KubeRay's own (the CRD schema itself does not close these objects).
    broken = copy.deepcopy(cluster)
    broken["spec"]["workerGroupSpecs"][0]["replcas"] = broken["spec"]["workerGroupSpecs"][0].pop("replicas")
    assert any("replcas" in e for e in _crd_errors(broken))


def test_kustomization_lists_every_manifest():
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    listed = kustomization["resources"]
    assert len(listed) == len(set(listed))
    assert set(listed) == set(_documents())


def test_kustomization_names_every_image():
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    names = {entry["name"] for entry in kustomization["images"]}
    used = {c["image"].rsplit(":", 1)[0] for t in _pod_templates() for c in t["spec"]["containers"]}
    assert used == names


def _pod_templates() -> list[dict]:
    cluster = _cluster()
    jobs = [o["spec"]["template"] for o in _objects() if o["kind"] == "Job"]
    return list(_ray_templates(cluster).values()) + jobs


# --- the gateway: Service, probe, config --------------------------------------------------------


def _probed_templates() -> list[str]:
    return [
        group
        for group, template in _ray_templates(_cluster()).items()
        if any("grpc" in c.get("readinessProbe", {}) for c in template["spec"]["containers"])
    ]


def test_service_selects_the_probed_head_and_no_worker():
    service = _gateway_service()
    assert service["spec"]["type"] == "ClusterIP"
    selector = service["spec"]["selector"]
    assert not any(key.startswith("ray.io/") for key in selector), "select by our labels, not KubeRay's"
    assert _probed_templates() == ["head"]
    for group, template in _ray_templates(_cluster()).items():
        labels = template["metadata"]["labels"]
        assert (selector.items() <= labels.items()) == (group == "head"), group


def test_probe_port_is_the_service_target_and_the_config_address():
    service = _gateway_service()
    (port,) = service["spec"]["ports"]
    assert port["appProtocol"] == "grpc"
    head = _head_container()
    target = port["targetPort"]
    if isinstance(target, str):
        (target,) = [p["containerPort"] for p in head["ports"] if p.get("name") == target]
    probe = head["readinessProbe"]["grpc"]
    _, config_port = config_mod.parse_address(_service_config()["address"])
    assert probe["port"] == target == config_port


def test_probe_checks_the_service_name_the_server_registers():
    from loader.gateway.server import SERVICE_NAME

    assert _head_container()["readinessProbe"]["grpc"]["service"] == SERVICE_NAME


def _token_path(template: dict, container: dict) -> str:
    secret = _one("Secret")
    (key,) = {**secret.get("data", {}), **secret.get("stringData", {})}
    return f"{_mount_of(template, container, _secret(secret['metadata']['name']))}/{key}"


def test_token_file_is_the_mounted_secret():
    head_template = _cluster()["spec"]["headGroupSpec"]["template"]
    assert _service_config()["token_file"] == _token_path(head_template, _head_container())


def _loadable_config(tmp_path: Path, token: str) -> Path:
    """config.yaml as shipped, but with token_file pointing at a file in tmp_path holding `token`:
    the loader reads the token file when it checks the config, and /run/secrets does not exist here."""
    values = _service_config()
    token_file = tmp_path / "token"
    token_file.write_text(token)
    values["token_file"] = str(token_file)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def test_config_loads_with_the_project_loader(tmp_path):
    config = config_mod.load(_loadable_config(tmp_path, "s3cr3t-token-for-the-test"))
    head_template = _cluster()["spec"]["headGroupSpec"]["template"]
    head = _head_container()
    assert config.address == _service_config()["address"]
    head_shards = _mount_of(head_template, head, _claim("loader-shards"))
    assert config.shards and all(_under(p, head_shards) for p in config.shards)
    assert config.reference is not None
    # Every Ray pod sees the shards, the reference weights and state_dir at the same paths.
    for group, template in _ray_templates(_cluster()).items():
        container = template["spec"]["containers"][0]
        shards = _mount_of(template, container, _claim("loader-shards"))
        state = _mount_of(template, container, _claim("loader-state"))
        assert all(_under(p, shards) for p in config.shards), group
        assert _under(config.reference.weights, shards), group
        assert _under(config.state_dir, state), group


def test_shipped_secret_is_refused_until_a_token_is_put_in(tmp_path):
    # Fail closed: the placeholder must not let the service start without authentication.
    secret = _one("Secret")
    (placeholder,) = {**secret.get("data", {}), **secret.get("stringData", {})}.values()
    with pytest.raises(ConfigError) as err:
        config_mod.load(_loadable_config(tmp_path, placeholder))
    assert err.value.key == "token_file"


def test_volumes_are_shared_claims():
    for name in ("loader-shards", "loader-state", "loader-checkpoints"):
        claim = _one("PersistentVolumeClaim", name)
        assert claim["spec"]["accessModes"] == ["ReadWriteMany"], name


# --- what the Ray pods run ----------------------------------------------------------------------


def _script(container: dict) -> str:
    assert container["command"][:2] == ["/bin/bash", "-c"]
    (script,) = container["args"]
    return script


def test_head_runs_loader_serve_on_the_mounted_config():
    cluster = _cluster()
    # Our own container commands only take effect with this annotation.
    assert cluster["metadata"]["annotations"]["ray.io/overwrite-container-cmd"] == "true"
    (line,) = [line for line in _script(_head_container()).splitlines() if line.strip().startswith("loader serve")]
    argv = [word for word in shlex.split(line) if word != "&"]
    from loader.cli import parser

    args = parser().parse_args(argv[1:])
    assert args.command == "serve" and args.ray_address == "auto"
    head_template = cluster["spec"]["headGroupSpec"]["template"]
    config_dir = _mount_of(head_template, _head_container(), _config_map("loader-config"))
    assert args.config == f"{config_dir}/config.yaml"


def test_every_ray_container_runs_the_generated_ray_start():
    if shutil.which("bash") is None:
        pytest.skip("no bash to check the container scripts with")
    for group, template in _ray_templates(_cluster()).items():
        script = _script(template["spec"]["containers"][0])
        assert '"$KUBERAY_GEN_RAY_START_CMD"' in script, group
        checked = subprocess.run(["bash", "-n", "-c", script], capture_output=True, text=True)
        assert checked.returncode == 0, f"{group}: {checked.stderr}"


# Stand-ins for `ray` and `loader` to run the head's script as the container would, here.
_RAY_STUB = """#!/bin/bash
[ "$1" = health-check ] && exit "$RAY_HEALTH"
exit 1
"""
_LOADER_STUB = """#!/bin/bash
printf '%s\\n' "$@" > "$STUB_DIR/argv"
[ -n "$SERVE_EXIT" ] && exit "$SERVE_EXIT"
sleep 600 >/dev/null 2>&1 &
child=$!
trap 'kill "$child"; echo drained > "$STUB_DIR/drained"; exit 0' TERM
echo listening
wait "$child"
"""


def _start_head_script(tmp_path: Path, ray_start: str, health: int = 0, serve_exit: str = "") -> subprocess.Popen:
    if shutil.which("bash") is None:
        pytest.skip("no bash to run the head's script with")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("ray", _RAY_STUB), ("loader", _LOADER_STUB)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    head = _head_container()
    env = {
        "PATH": f"{bin_dir}:/usr/bin:/bin",
        "STUB_DIR": str(tmp_path),
        "KUBERAY_GEN_RAY_START_CMD": ray_start,
        "RAY_HEALTH": str(health),
        "SERVE_EXIT": serve_exit,
    }
    # Its own session, so that the test can end every process the script left behind.
    return subprocess.Popen(
        [*head["command"], *head["args"]], env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        text=True, start_new_session=True,
    )  # fmt: skip


def _end_session(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)
    proc.stdout.close()


def test_head_script_serves_once_ray_is_up_and_drains_on_sigterm(tmp_path):
    proc = _start_head_script(tmp_path, "exec sleep 600 >/dev/null 2>&1")
    try:
        assert proc.stdout.readline() == "listening\n"  # the service was started ...
        argv = (tmp_path / "argv").read_text().split()
        assert argv == ["serve", "--config", "/etc/loader/config.yaml", "--ray-address", "auto"]
        proc.send_signal(signal.SIGTERM)  # ... and kubelet stops the pod
        assert proc.wait(timeout=60) == 143
        assert (tmp_path / "drained").read_text() == "drained\n", "SIGTERM did not reach the service"
    finally:
        _end_session(proc)


def test_head_script_ends_with_the_service(tmp_path):
    # A service that stops at once (a config error, exit status 2) must end the container, so the
    # head crash-loops visibly instead of idling with Ray alone, even if it exits before `wait`.
    proc = _start_head_script(tmp_path, "exec sleep 600 >/dev/null 2>&1", serve_exit="2")
    try:
        assert proc.wait(timeout=60) == 2
    finally:
        _end_session(proc)


def test_head_script_ends_when_ray_start_fails(tmp_path):
    proc = _start_head_script(tmp_path, "exit 3", health=1)
    try:
        assert proc.wait(timeout=60) == 1
        assert not (tmp_path / "argv").exists(), "the service was started without a Ray to join"
    finally:
        _end_session(proc)


def _ray_resources(group: dict) -> dict[str, float]:
    # KubeRay pastes the value into a shell command: one shell word holding a JSON object.
    (word,) = shlex.split(group["rayStartParams"]["resources"])
    return json.loads(word)


def test_readers_and_scorers_have_their_own_groups():
    cluster = _cluster()
    config = _service_config()
    readers, scorers = _worker_group(cluster, "readers"), _worker_group(cluster, "scorers")

    reader_slots = _ray_resources(readers)
    assert set(reader_slots) == {"loader_reader"}
    assert readers["replicas"] * reader_slots["loader_reader"] >= config["readers"]
    reader_limits = readers["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert "nvidia.com/gpu" not in reader_limits

    scorer_slots = _ray_resources(scorers)
    assert set(scorer_slots) == {"loader_scorer"}
    assert scorers["replicas"] * scorer_slots["loader_scorer"] >= config["scorers"]
    spec = scorers["template"]["spec"]
    gpus = int(spec["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
    assert scorer_slots["loader_scorer"] * config["scorer_gpus"] <= gpus
    assert any(t["key"] == "nvidia.com/gpu" and t["effect"] == "NoSchedule" for t in spec["tolerations"])

    # No Ray CPUs on the head, so nothing that asks for CPUs is placed beside the gateway.
    assert cluster["spec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"


# --- the trainer Job ----------------------------------------------------------------------------


def _env(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container["env"]}


def test_trainer_job_has_two_torchrun_style_ranks():
    job = _one("Job", "loader-trainer")
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == spec["parallelism"] == 2
    (container,) = spec["template"]["spec"]["containers"]
    env = _env(container)
    assert int(env["WORLD_SIZE"]["value"]) == spec["completions"]
    assert env["RANK"]["valueFrom"]["fieldRef"]["fieldPath"] == (
        "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    )
    # Rank 0's stable hostname under the headless Service named as the pods' subdomain.
    subdomain = spec["template"]["spec"]["subdomain"]
    assert env["MASTER_ADDR"]["value"] == f"{job['metadata']['name']}-0.{subdomain}"
    headless = _one("Service", subdomain)
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["selector"].items() <= spec["template"]["metadata"]["labels"].items()
    assert int(env["MASTER_PORT"]["value"]) in [p["port"] for p in headless["spec"]["ports"]]


def test_trainer_dials_the_gateway_service_with_the_token_file():
    job = _one("Job", "loader-trainer")
    template = job["spec"]["template"]
    (container,) = template["spec"]["containers"]
    names = [e["name"] for e in container["env"]]
    env = _env(container)
    service = _gateway_service()
    (port,) = service["spec"]["ports"]
    # $(POD_NAMESPACE) is only expanded when that variable is defined earlier in the list.
    assert names.index("POD_NAMESPACE") < names.index("LOADER_ADDRESS")
    assert env["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    assert env["LOADER_ADDRESS"]["value"] == f"{service['metadata']['name']}.$(POD_NAMESPACE).svc:{port['port']}"
    assert env["LOADER_TOKEN_FILE"]["value"] == _token_path(template, container)
    assert "LOADER_TOKEN" not in env, "the token goes as a file, not an environment value"
    assert container["command"] == ["python", "examples/k8s_trainer.py"]


def test_trainer_example_reads_the_job_environment():
    script = ROOT / "examples" / "k8s_trainer.py"
    if not script.is_file():
        pytest.skip(f"{script.relative_to(ROOT)} (what the trainer Job runs) is not in this checkout yet")
    source = script.read_text()
    for name in ("LOADER_ADDRESS", "LOADER_TOKEN_FILE", "RANK", "WORLD_SIZE", "CHECKPOINT_DIR"):
        assert f'"{name}"' in source, f"{script.name} does not read ${name}, which the Job sets"


def test_trainer_checkpoints_outlive_the_pod():
    template = _one("Job", "loader-trainer")["spec"]["template"]
    (container,) = template["spec"]["containers"]
    mount = _mount_of(template, container, _claim("loader-checkpoints"))
    assert _under(_env(container)["CHECKPOINT_DIR"]["value"], mount)
    assert _one("PersistentVolumeClaim", "loader-checkpoints")["spec"]["accessModes"] == ["ReadWriteMany"]


# --- the images ---------------------------------------------------------------------------------


def _arg_default(dockerfile: str, name: str) -> str:
    (value,) = re.findall(rf"^ARG {name}=(\S+)$", dockerfile, flags=re.M)
    return value


def _pip_installs(dockerfile: str) -> list[str]:
    return [line for line in dockerfile.splitlines() if re.match(r"^RUN .*\bpip install\b", line)]


def test_images_pin_torch_like_the_makefile_and_install_it_first():
    (make_default,) = re.findall(r"^TORCH_SPEC \?= (\S+)$", (ROOT / "Makefile").read_text(), flags=re.M)
    for name in ("server.Dockerfile", "trainer.Dockerfile"):
        dockerfile = (DOCKER / name).read_text()
        assert _arg_default(dockerfile, "TORCH_SPEC") == make_default, name
        installs = _pip_installs(dockerfile)
        assert "TORCH_SPEC" in installs[0] and len(installs) == 2, name


def test_server_image_has_the_server_and_the_projects_ray():
    dockerfile = (DOCKER / "server.Dockerfile").read_text()
    assert '".[server]"' in _pip_installs(dockerfile)[1]
    pins = re.findall(r'"ray(?:\[[^\]]*\])?==([^"]+)"', (ROOT / "pyproject.toml").read_text())
    assert len(set(pins)) == 1, f"expected one ray pin in pyproject.toml, found {pins}"
    assert _arg_default(dockerfile, "RAY_VERSION") == pins[0] == _cluster()["spec"]["rayVersion"]


def test_trainer_image_is_the_client_only():
    dockerfile = (DOCKER / "trainer.Dockerfile").read_text()
    installs = _pip_installs(dockerfile)
    assert re.search(r"pip install \.$", installs[1]), installs[1]
    for line in installs:
        assert "[server]" not in line and not re.search(r"\bray\b", line, flags=re.I), line


def test_dockerignore_keeps_what_the_images_copy():
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for name in ("server.Dockerfile", "trainer.Dockerfile"):
        for line in (DOCKER / name).read_text().splitlines():
            if not line.startswith("COPY "):
                continue
            sources = [w for w in shlex.split(line)[1:-1] if not w.startswith("--")]
            for source in sources:
                assert (ROOT / source).exists(), f"{name}: {source} is not in the repository"
                assert not any(fnmatch.fnmatch(source, p) for p in patterns), f"{name}: {source} is ignored"
