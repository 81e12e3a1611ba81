# shmmel on an NVIDIA CUDA runtime image (CuPy compiles its kernel with NVRTC, which the
# runtime image ships).
#   docker build -t shmmel .
#   docker run --gpus all --shm-size=256m -p 8000:8000 shmmel
# /dev/shm must hold the data segment (slots x slot_bytes, 16 MiB by default): Docker's
# default of 64 MiB is enough for the defaults; raise --shm-size with larger settings.
FROM nvidia/cuda:12.6.3-runtime-ubuntu24.04

RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --create-home --home-dir /opt/shmmel shmmel

WORKDIR /opt/shmmel
COPY pyproject.toml README.md ./
COPY src ./src
COPY cli ./cli
COPY config ./config
RUN python3 -m venv .venv && .venv/bin/pip install --no-cache-dir '.[cuda]'

USER shmmel
EXPOSE 8000
# Settings: SHMMEL_* variables, or mount a TOML file and set SHMMEL_CONFIG to its path.
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s \
  CMD python3 -c "import urllib.request as u; u.urlopen('http://127.0.0.1:8000/readyz', timeout=2)"
# --foreground: the supervisor stays attached as PID 1; `docker stop` sends SIGTERM, which
# is the graceful shutdown. In a container it must listen beyond loopback (a flag, so it
# wins over any mounted config file).
ENTRYPOINT ["/opt/shmmel/.venv/bin/shmmel", "up", "--foreground", "--host", "0.0.0.0"]
