# surgenet-assist: the Label Studio ML backend (`serve`) and the nightly trainer share this image.
# CUDA wheels of torch come from PyPI; the GPU is reserved per service in docker-compose.yml.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    SURGENET_ASSIST_HOME=/data/surgenet PROMETHEUS_MULTIPROC_DIR=/tmp/prometheus
RUN apt-get update && apt-get install -y --no-install-recommends libgl1 libglib2.0-0 ffmpeg curl \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY pyproject.toml README.md ./
COPY core core
COPY backend backend
COPY cli cli
COPY napari_plugin napari_plugin
COPY training_loop training_loop
RUN pip install --upgrade pip && pip install ".[backend]" && mkdir -p /data/surgenet /tmp/prometheus

EXPOSE 9090
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD curl -fsS http://127.0.0.1:9090/health || exit 1
CMD ["surgenet-assist", "serve", "--host", "0.0.0.0", "--port", "9090", "--workers", "1", "--registry"]
