# syntax=docker/dockerfile:1
# The GPU worker image: the official vLLM 0.33.0 OpenAI server plus this project's GUARD logits processor, which
# vLLM loads from the `vllm.logits_processors` entry point (a no-op for requests without guard_* vllm_xargs).
# Flags that the gateway's policies need are part of the entrypoint, so a compose `command:` cannot drop them:
#   --enable-prompt-embeds   ECO sends corrupted prompt embeddings as chat content parts
#   --max-logprobs 64        ULD lock-step decoding asks for the top-K logprobs of every step (K <= 64)
#   VLLM_USE_V2_MODEL_RUNNER=1  the plugin implements the Model Runner V2 processor interface
# The command (CMD) names the model: a folder mounted at /models/served by default, or a hub id plus options.
# Build from the repository root:  docker build -f docker/vllm-worker.Dockerfile -t unlearn-vllm-worker:0.1.0 .

FROM python:3.12.8-slim-bookworm AS plugin
WORKDIR /src
COPY pyproject.toml README.md ./
COPY gateway ./gateway
COPY classifiers ./classifiers
COPY policies ./policies
COPY models ./models
COPY evals ./evals
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

FROM vllm/vllm-openai:v0.33.0
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
COPY --from=plugin /wheels /tmp/wheels
# --no-deps: the plugin needs only torch, and vLLM's CUDA build of it must stay. The build fails if torch changed,
# if the entry point is not registered, or if the plugin cannot import vLLM's processor interface.
RUN python3 -c "import torch; print(torch.__version__)" > /tmp/torch.before \
 && python3 -m pip install --no-cache-dir --no-deps /tmp/wheels/*.whl \
 && python3 -c "import torch; print(torch.__version__)" | cmp - /tmp/torch.before \
 && python3 -c "from importlib.metadata import entry_points; assert 'unlearn_guard' in {e.name for e in entry_points(group='vllm.logits_processors')}" \
 && python3 -c "import policies.vllm_plugin as p; assert p.VLLM_AVAILABLE, 'vLLM processor interface not found'" \
 && rm -rf /tmp/wheels /tmp/torch.before \
 && useradd --uid 10002 --create-home --home-dir /home/vllm --shell /usr/sbin/nologin vllm
ENV VLLM_USE_V2_MODEL_RUNNER=1 HF_HOME=/home/vllm/.cache/huggingface
USER 10002:10002
WORKDIR /home/vllm
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=600s --retries=3 \
  CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]
ENTRYPOINT ["vllm", "serve", "--host", "0.0.0.0", "--port", "8000", "--enable-prompt-embeds", "--max-logprobs", "64"]
CMD ["/models/served"]
