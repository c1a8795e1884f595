# syntax=docker/dockerfile:1
# kobot: one image for `kobot telegram`, `kobot discord`, `kobot chat` and the admin commands.
#
#   docker build -t kobot .                      # CPU torch (default; ~1 GB image)
#   docker build -t kobot:cuda \
#     --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu124 .   # CUDA 12.4 torch
#
# PyPI's Linux torch wheel pulls several GB of CUDA libraries, so torch comes from the PyTorch
# index: CPU wheels by default, CUDA wheels (they bundle their CUDA runtime) with the build arg;
# a CUDA image needs an NVIDIA driver and the NVIDIA Container Toolkit on the host, and a GPU
# reservation in docker-compose.yml. TORCH_SPEC pins a version (e.g. torch==2.5.1).
# With KOBOT_BACKEND=openai the generation runs in vLLM and the CPU image is all the bots need.

ARG PYTHON_VERSION=3.11

# --- build: a virtual environment with torch and kobot ------------------------------------
FROM python:${PYTHON_VERSION}-slim AS build
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_SPEC="torch>=2.1"
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/kobot
ENV PATH=/opt/kobot/bin:$PATH
RUN pip install --index-url "$TORCH_INDEX_URL" "$TORCH_SPEC"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY core ./core
COPY bots ./bots
COPY storage ./storage
# torch is installed already, so pip keeps that build (CPU or CUDA) and adds the rest from PyPI
RUN pip install . \
    && python -c "import torch, bots.cli; print('torch', torch.__version__)"
# the engine's C++ kernels, built here for every x86-64 level (AVX-512, AVX2, plain), so the
# runtime image needs no compiler and runs on whichever CPU it lands on
RUN apt-get update && apt-get install -y --no-install-recommends g++ \
    && cd / && python -m core.generation.engine.kernels.build /opt/kobot/kernels

# --- runtime: the environment only, as an unprivileged user -------------------------------
FROM python:${PYTHON_VERSION}-slim AS runtime
RUN groupadd --system --gid 10001 kobot \
    && useradd --system --uid 10001 --gid kobot --home-dir /data --shell /usr/sbin/nologin kobot \
    && mkdir -p /data/hf \
    && chown -R kobot:kobot /data
COPY --from=build /opt/kobot /opt/kobot
ENV PATH=/opt/kobot/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HOME=/data/hf \
    KOBOT_METRICS_PORT=9100 \
    KOBOT_METRICS_HOST=0.0.0.0 \
    KOBOT_ENGINE_KERNEL_DIR=/opt/kobot/kernels
# The Hugging Face cache (the model, downloaded once) lives on a volume; so does SQLite's
# kobot.db when no KOBOT_DATABASE_URL is given (relative to the working directory /data).
VOLUME ["/data/hf"]
WORKDIR /data
USER kobot:kobot
EXPOSE 9100
# /healthz: storage, Redis, model loaded, platform connected (start_period covers the download)
HEALTHCHECK --interval=30s --timeout=10s --start-period=180s --retries=3 CMD ["kobot", "health"]
ENTRYPOINT ["kobot"]
CMD ["chat"]
