# Image for docker-compose.yml (not built in this project's CI: no Docker engine there).
FROM python:3.11-slim
WORKDIR /app
COPY . .
RUN pip install --no-cache-dir .
ENV GPU_DISPATCH_HOME=/tmp/gpu-dispatch
