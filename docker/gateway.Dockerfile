# The gateway image: CPU torch, the package with its demo model twins, non-root, offline at run time.
# Build from the repository root: docker build -f docker/gateway.Dockerfile -t unlearn-gateway .
FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# CPU wheel of torch first, so no CUDA build is pulled in by the dependencies.
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
WORKDIR /src
COPY pyproject.toml README.md ./
COPY gateway ./gateway
COPY classifiers ./classifiers
COPY policies ./policies
COPY models ./models
COPY evals ./evals
RUN pip install .

FROM python:3.11-slim
RUN useradd --create-home --uid 10001 unlearn
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 UNLEARN_HOST=0.0.0.0 UNLEARN_PORT=8000
USER unlearn
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
  CMD ["python", "-c", "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/health').status == 200 else 1)"]
ENTRYPOINT ["unlearn-gateway"]
CMD ["serve"]
