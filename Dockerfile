# syntax=docker/dockerfile:1
#
# One image holding all orderflow binaries (the five services, the
# dead-letters tool and the api-keys tool); pick one with the command,
# e.g. `docker run orderflow:latest order-api` (docker-compose.yml does this).
# Needs BuildKit for the cache mounts: Docker 23+ with the buildx plugin
# (Docker Desktop has it; on Debian, the docker-buildx package).

# ---- build ---------------------------------------------------------------
# Edition 2024 needs Rust >= 1.88; rust:1 tracks the latest 1.x release.
FROM rust:1-bookworm AS builder
WORKDIR /app

# Only what the build needs (see also .dockerignore). migrations/ is embedded
# at compile time by sqlx::migrate!("../../migrations"), and the statements
# sqlx checks at compile time are checked against .sqlx/ (SQLX_OFFLINE): no
# database is needed at build time.
COPY Cargo.toml Cargo.lock ./
COPY crates ./crates
COPY migrations ./migrations
COPY .sqlx ./.sqlx
ENV SQLX_OFFLINE=true

# The registry and target dir are BuildKit cache mounts, so they are not part
# of the image layer: the binaries must be copied out in this same RUN.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    --mount=type=cache,target=/app/target \
    cargo build --release --locked \
        -p order-api -p order-processor -p notification-service -p logging-service \
        -p order-stats -p dead-letters -p payment-provider \
    && mkdir -p /out \
    && cp target/release/order-api \
          target/release/order-processor \
          target/release/notification-service \
          target/release/logging-service \
          target/release/order-stats \
          target/release/dead-letters \
          target/release/api-keys \
          target/release/payment-provider \
          /out/

# ---- runtime -------------------------------------------------------------
FROM debian:bookworm-slim AS runtime

# ca-certificates for TLS to brokers/databases, curl for the compose healthchecks.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/*

RUN groupadd --system --gid 10001 orderflow \
    && useradd --system --uid 10001 --gid orderflow --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin orderflow

COPY --from=builder /out/ /usr/local/bin/

WORKDIR /app
USER 10001:10001

# Defaults: order-api 8080, order-processor 8081, notification-service 8082,
# logging-service 8083, order-stats 8084 (HTTP_PORT; each serves /healthz
# and /readyz).
EXPOSE 8080 8081 8082 8083 8084 8085

# No ENTRYPOINT: the command names the binary to run.
CMD ["order-api"]
