# tally in a container: `docker compose up` (see docker-compose.yml), or
#   docker build -t tally . && docker run -p 8080:8080 -e TALLY_AUTH_ADMIN_TOKEN=... \
#     -e TALLY_REDIS_URL=redis://redis-host:6379/0 -v tally-data:/data tally
# Binding 0.0.0.0 needs TALLY_AUTH_ADMIN_TOKEN: tally refuses a non-loopback address without it.

FROM rust:1-bookworm AS builder
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin tally

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --user-group --home-dir /data --shell /usr/sbin/nologin tally \
    && mkdir -p /data /etc/tally \
    && chown tally:tally /data
COPY --from=builder /src/target/release/tally /usr/local/bin/tally
COPY config/default.toml /etc/tally/default.toml
ENV TALLY_HTTP_ADDR=0.0.0.0:8080 \
    TALLY_STORAGE_DATA_DIR=/data
VOLUME ["/data"]
USER tally
WORKDIR /data
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD curl -fsS http://127.0.0.1:8080/healthz || exit 1
ENTRYPOINT ["tally"]
CMD ["serve", "--config", "/etc/tally/default.toml"]
