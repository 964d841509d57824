# The trainer Job's image (k8s/trainer-job.yaml): the client only. A trainer needs grpcio,
# protobuf, pyarrow, numpy and torch to stream batches through RemoteLoader, and nothing of the
# server: no Ray, no scikit-learn. Build from the repository root:
#   docker build -f docker/trainer.Dockerfile -t loader-trainer:0.1.0 .
#
# python-slim rather than a Ray image: without Ray there is no reason to carry one, and slim
# plus torch is the smallest image that runs the client. Pass a CUDA TORCH_INDEX_URL (see
# docker/server.Dockerfile) for trainers on GPU nodes.
ARG PYTHON_VERSION=3.11
FROM python:${PYTHON_VERSION}-slim

ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1

# torch first and pinned, for the same reason as in the server image.
ARG TORCH_SPEC=torch==2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN pip install --index-url "${TORCH_INDEX_URL}" "${TORCH_SPEC}"

WORKDIR /src
COPY pyproject.toml README.md ./
COPY loader ./loader
COPY actors ./actors
# The base package, without extras: `from loader import RemoteLoader` and nothing of the server.
RUN pip install .

# The uid/gid the manifests run as (runAsUser 1000, fsGroup 100 makes the token file readable).
RUN useradd --uid 1000 --gid 100 --create-home trainer
WORKDIR /app
COPY examples ./examples
USER 1000:100
CMD ["python", "examples/k8s_trainer.py"]
