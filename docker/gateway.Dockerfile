# syntax=docker/dockerfile:1
# The gateway image: CPU torch, the package with its demo model twins, the packaged sentence encoder and its ONNX
# export baked in, non-root, offline at run time (HF_HUB_OFFLINE=1: nothing is fetched from a hub).
# Build from the repository root:  docker build -f docker/gateway.Dockerfile -t unlearn-gateway:0.1.0 .

FROM python:3.11.11-slim-bookworm AS build
ARG TORCH_VERSION=2.13.0
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PATH=/opt/venv/bin:$PATH
# CPU wheel of torch first, from the PyTorch CPU index: the dependencies then find torch satisfied and pull in no
# multi-GB CUDA build.
RUN python -m venv /opt/venv \
 && pip install --no-cache-dir "torch==${TORCH_VERSION}" --index-url https://download.pytorch.org/whl/cpu
WORKDIR /src
COPY pyproject.toml README.md ./
COPY gateway ./gateway
COPY classifiers ./classifiers
COPY policies ./policies
COPY models ./models
COPY evals ./evals
# `otel`: tracing stays off until UNLEARN_OTEL_ENDPOINT is set, but needs no install step then.
# hadolint ignore=DL3013
RUN pip install --no-cache-dir ".[otel]"
# Export the packaged MiniLM encoder to (int8) ONNX, distil its static token table (the encoder gate) and embed the
# generic negatives (every classifier build needs them) now, into a folder the image ships: at run time that folder
# is read-only, so whatever is not baked is recomputed by every process. Then prove that both the encoder and the
# demo model load with the hub switched off.
ENV HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 UNLEARN_CACHE_DIR=/opt/unlearn/cache
WORKDIR /
RUN python -m classifiers.warm \
 && python -c "from models import resolve_model_path; print(resolve_model_path('demo'))"

FROM python:3.11.11-slim-bookworm AS runtime
RUN groupadd --gid 10001 unlearn \
 && useradd --uid 10001 --gid 10001 --create-home --home-dir /home/unlearn --shell /usr/sbin/nologin unlearn \
 && mkdir -p /var/lib/unlearn \
 && chown 10001:10001 /var/lib/unlearn
COPY --from=build /opt/venv /opt/venv
COPY --from=build /opt/unlearn/cache /opt/unlearn/cache
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    UNLEARN_CACHE_DIR=/opt/unlearn/cache \
    UNLEARN_HOST=0.0.0.0 \
    UNLEARN_PORT=8000 \
    UNLEARN_STORE_PATH=/var/lib/unlearn/targets.db
USER 10001:10001
WORKDIR /home/unlearn
EXPOSE 8000
# Liveness of the HTTP server; readiness (engine reachable, targets loaded) is GET /ready, for load balancers.
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('UNLEARN_PORT', '8000'), timeout=2)"]
ENTRYPOINT ["unlearn-gateway"]
CMD ["serve"]
