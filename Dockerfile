# One image for every process of the fleet: miner, GPU/CPU workers, beat, Flower.
# GPU hosts: build with --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu130 (cu126 for drivers
# older than CUDA 13 or pre-Turing GPUs): torch 2.13 publishes no cu124 or cu128 build.
# docker-compose passes TORCH_INDEX from .env.
FROM python:3.11-slim

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1

RUN apt-get update && apt-get install -y --no-install-recommends build-essential curl \
    && rm -rf /var/lib/apt/lists/*
# ~/.bittensor owned by the miner: the wallets mount (read-only) lands inside it, and a folder Docker
# creates for a bind mount is root's, where bittensor could write nothing.
RUN useradd --create-home --uid 1000 miner \
    && mkdir -p /home/miner/.bittensor/wallets && chown -R miner:miner /home/miner/.bittensor
WORKDIR /app
RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX}"
COPY pyproject.toml README.md beat_schedule.py ./
COPY core core
COPY miner miner
COPY workers workers
COPY synth_miner synth_miner
COPY models models
RUN pip install . && mkdir -p /app/artifacts /app/data && chown -R miner /app
USER miner
ENV SYNTH_ARTIFACTS_DIR=/app/artifacts SYNTH_DATA_DIR=/app/data
ENTRYPOINT ["synth-miner"]
CMD ["--help"]
