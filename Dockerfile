# crossbatch: multi-stage build. The builder gets libtorch 2.11.0 from PyPI (the CUDA-enabled
# wheel) exactly as `make build` does; the runtime image carries that torch library directory,
# the binary, models/ and config/. Run with `--gpus all` to use a GPU.
FROM rust:1-bookworm AS builder
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv make \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
# torch first (the version scripts/setup.sh installs): it needs none of the sources, so this
# layer stays cached when they change. .dockerignore keeps a local .venv out of `COPY . .`.
RUN python3 -m venv .venv && .venv/bin/pip install --no-cache-dir torch==2.11.0
ENV VIRTUAL_ENV=/src/.venv PATH=/src/.venv/bin:$PATH LIBTORCH_USE_PYTORCH=1
COPY . .
RUN cargo build --release
# Gather torch's shared libraries and the CUDA runtime libraries the wheel depends on.
RUN mkdir -p /opt/torch-lib \
    && cp -a .venv/lib/python3*/site-packages/torch/lib/. /opt/torch-lib/ \
    && find .venv/lib/python3*/site-packages/nvidia -name '*.so*' -exec cp -a {} /opt/torch-lib/ \;

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates libgomp1 \
    && rm -rf /var/lib/apt/lists/*
COPY --from=builder /opt/torch-lib /opt/torch-lib
COPY --from=builder /src/target/release/crossbatch /usr/local/bin/crossbatch
COPY models /app/models
COPY config /app/config
WORKDIR /app
ENV LD_LIBRARY_PATH=/opt/torch-lib CROSSBATCH__SERVER__ADDR=0.0.0.0:8080 \
    CROSSBATCH__SERVER__DATA_DIR=/data
VOLUME /data
EXPOSE 8080
ENTRYPOINT ["crossbatch"]
CMD ["serve"]
