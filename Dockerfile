# Drover in a container: `docker build -t drover .`, then `docker run -p 8080:8080 -p 1883:1883 drover`.
# compose.yaml runs three of them as a cluster behind HAProxy.

# ---- build --------------------------------------------------------------------------------
FROM rust:1.95-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends libpq-dev libsqlite3-dev pkg-config \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p drover --bin drover \
    && cp target/release/drover /usr/local/bin/drover

# ---- run ----------------------------------------------------------------------------------
FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends libpq5 libsqlite3-0 ca-certificates curl \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --home /var/lib/drover --create-home drover \
    && mkdir -p /run/drover-keys && chown drover /run/drover-keys && chmod 700 /run/drover-keys
COPY --from=build /usr/local/bin/drover /usr/local/bin/drover
USER drover
WORKDIR /var/lib/drover
ENV DATA_DIR=/var/lib/drover \
    HTTP_BIND=0.0.0.0 \
    MQTT_BIND=0.0.0.0
EXPOSE 8080 1883 8883
VOLUME ["/var/lib/drover"]
HEALTHCHECK --interval=10s --timeout=3s --retries=3 CMD curl -fsS http://127.0.0.1:8080/health || exit 1
ENTRYPOINT ["drover"]
