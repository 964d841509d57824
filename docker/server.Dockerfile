# The image of every Ray pod in k8s/raycluster.yaml: the head runs `loader serve`, the workers
# run `ray start`. Build from the repository root:
#   docker build -f docker/server.Dockerfile -t loader-server:0.1.0 .
#   docker build -f docker/server.Dockerfile -t loader-server-gpu:0.1.0 \
#     --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 .
#
# Based on rayproject/ray, not python-slim: the probes KubeRay injects into Ray pods call wget
# against the dashboard and the dashboard agent, which need wget and `ray[default]`; this image
# has both, plus the `ray` user (uid 1000, group 100) the manifests run as. Its Ray must equal
# the project's `ray==` pin, so that installing the project keeps it instead of replacing it.
# CPU base for the GPU image too: a CUDA torch wheel brings its own CUDA libraries, and the node's
# driver comes in through the NVIDIA container runtime.
ARG RAY_VERSION=2.60.0
ARG PYTHON_TAG=py311
FROM rayproject/ray:${RAY_VERSION}-${PYTHON_TAG}-cpu

# torch first, pinned, from the PyTorch index of the wanted build (CPU by default), so that the
# project's open `torch>=` requirement is already met and pip never pulls a default CUDA build.
# A GPU image passes a CUDA index (above) and, if it wants a local version, a TORCH_SPEC such as
# torch==2.13.0+cu128.
ARG TORCH_SPEC=torch==2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" "${TORCH_SPEC}"

# Only what the package is built from (see .dockerignore), so code edits elsewhere keep the
# torch layer cached.
WORKDIR /home/ray/src
COPY --chown=1000:100 pyproject.toml README.md ./
COPY --chown=1000:100 loader ./loader
COPY --chown=1000:100 actors ./actors
# The service and its CLI verbs live in the `server` extra; the base package is the client.
RUN pip install --no-cache-dir ".[server]"

# Out of the source tree, so `python` imports the installed package, not ./loader.
WORKDIR /home/ray
