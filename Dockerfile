# robustify: one image for the API, the GPU worker and the migrations.
#   docker build -t robustify .
#   docker compose up        (see docker-compose.yml)
# PyPI's torch wheels bring their own CUDA libraries; the CUDA runtime base image supplies the
# rest of the user-space stack, and the host only needs the NVIDIA driver + container toolkit.
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# libgl1 and libglib2.0: opencv-python (the common corruptions' cv2) loads them at import
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates tini libgl1 libglib2.0-0t64 \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/venv

WORKDIR /app
# torch first, in a layer of its own (cached while only the source changes), at the exact versions
# that CI tests: constraints.txt pins them and every other dependency.
COPY pyproject.toml README.md constraints.txt ./
RUN pip install -c constraints.txt torch torchvision
COPY api ./api
COPY core ./core
COPY worker ./worker
COPY migrations ./migrations
COPY cli ./cli
COPY robustify ./robustify
COPY alembic.ini ./
RUN pip install -c constraints.txt ".[server]" && python -c "import api.app, worker.tasks, migrations, robustify"

# Unprivileged user; /data holds the artifact store, RobustBench weights and data sets.
RUN useradd --create-home --uid 10001 robustify && mkdir -p /data && chown robustify /data
USER robustify
ENV ROBUSTIFY_DATA_DIR=/data \
    ROBUSTIFY_HOST=0.0.0.0
VOLUME ["/data"]
EXPOSE 8000

ENTRYPOINT ["/usr/bin/tini", "--", "robustify"]
# Without configuration the image runs the embedded default (SQLite + server-less broker, one worker);
# bound to 0.0.0.0 it requires API keys: `docker exec CONTAINER robustify keys create me`.
# docker stop sends SIGTERM: the API stops and the worker hands its running job back.
HEALTHCHECK --interval=15s --timeout=8s --start-period=60s CMD ["robustify", "health", "api"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]
