# syntax=docker/dockerfile:1
# The CPU worker image: the project's reference worker (the local transformers engine behind vLLM 0.33's OpenAI
# wire-protocol subset) for machines without a GPU. It generates with a real model: the shipped demo model by
# default, or a checkpoint folder mounted into the container (--model /models/NAME). Non-root, offline.
# Build from the repository root:  docker build -f docker/cpu-worker.Dockerfile -t unlearn-cpu-worker:0.1.0 .

FROM python:3.11.11-slim-bookworm AS build
ARG TORCH_VERSION=2.13.0
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PATH=/opt/venv/bin:$PATH
# CPU wheel of torch first (PyTorch CPU index), so the dependencies pull in no CUDA build.
RUN python -m venv /opt/venv \
 && pip install --no-cache-dir "torch==${TORCH_VERSION}" --index-url https://download.pytorch.org/whl/cpu
WORKDIR /src
COPY pyproject.toml README.md ./
COPY gateway ./gateway
COPY classifiers ./classifiers
COPY policies ./policies
COPY models ./models
COPY evals ./evals
# hadolint ignore=DL3013
RUN pip install --no-cache-dir .

FROM python:3.11.11-slim-bookworm AS runtime
RUN groupadd --gid 10001 unlearn \
 && useradd --uid 10001 --gid 10001 --create-home --home-dir /home/unlearn --shell /usr/sbin/nologin unlearn
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
USER 10001:10001
WORKDIR /home/unlearn
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=2)"]
ENTRYPOINT ["unlearn-gateway", "worker"]
CMD ["--model", "demo", "--host", "0.0.0.0", "--port", "8000"]
