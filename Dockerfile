# chatgate in front of a Chainlit app, in one container (the default, last target), or chatgate
# alone (`--target chatgate`) for when the backend runs in a container of its own.
#
#   docker build -t chatgate-app .                      # chatgate + examples/chainlit
#   docker build -t chatgate-app --build-arg APP_DIR=path/to/app .
#   docker build -t chatgate --target chatgate .         # proxy only, distroless, non-root
#   docker run --rm -p 8000:8000 chatgate-app            # then open http://localhost:8000/
#
# CHATGATE_WORKERS (environment) sets how many Chainlit processes run behind chatgate: 1 (the
# default) is one Chainlit, started by entrypoint.sh; a number above 1, or `auto` (one per CPU
# the container may use), makes chatgate start and supervise them itself, each chat kept on
# its process (see README, "Workers").
# Each idle Chainlit worker (examples/chainlit) takes about 115 MiB of RSS (105 MiB PSS),
# more with the app's own libraries and open chats: size the container's memory for it.
#
# Every stage is on Debian 12 (bookworm): the binary is linked against the builder's glibc, and
# a runtime image with an older glibc refuses to start it ("GLIBC_2.xx not found").
# No BuildKit-only syntax (cache mounts, COPY --chmod), so `az acr build` and the classic
# builder take it as is.

ARG RUST_IMAGE=rust:1-bookworm
ARG PYTHON_IMAGE=python:3.12-slim-bookworm
ARG DISTROLESS_IMAGE=gcr.io/distroless/cc-debian12:nonroot

# ---- Rust build: cargo-chef keeps the dependency build in its own cached layer -------------
FROM ${RUST_IMAGE} AS chef
RUN cargo install cargo-chef --locked --version 0.1.73
WORKDIR /build

FROM chef AS planner
COPY . .
RUN cargo chef prepare --recipe-path recipe.json

FROM chef AS builder
COPY --from=planner /build/recipe.json recipe.json
# Same as .cargo/config.toml (not in the cook step's context): jemalloc hands freed pages back
# to the system within about a second.
ENV JEMALLOC_SYS_WITH_MALLOC_CONF="background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:1000"
# Rebuilt only when the manifests or Cargo.lock change. Same flags as the build below, so only
# chatgate's dependencies are cooked, not the workspace's bench harness.
RUN cargo chef cook --release --locked --bin chatgate --recipe-path recipe.json
COPY . .
RUN cargo build --release --locked --bin chatgate \
    && ./target/release/chatgate --help > /dev/null

# ---- chatgate alone: distroless, no shell, runs as nonroot (65532) ---------------------------
FROM ${DISTROLESS_IMAGE} AS chatgate
COPY --from=builder /build/target/release/chatgate /usr/local/bin/chatgate
ENV CHATGATE_LISTEN=0.0.0.0:8000
USER 65532:65532
EXPOSE 8000
# Docker/Compose only; Azure Container Apps ignores HEALTHCHECK and uses probes.yaml.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["/usr/local/bin/chatgate", "healthcheck"]
# chatgate handles SIGTERM itself (drain, close 1001), so it can be PID 1 here.
ENTRYPOINT ["/usr/local/bin/chatgate"]

# ---- chatgate + Chainlit (default target) ---------------------------------------------------
FROM ${PYTHON_IMAGE} AS app

# tini is PID 1: it forwards SIGTERM to entrypoint.sh (which stops chatgate, then the backend)
# and reaps zombies. No `-g`: the script decides the order, not a process-group broadcast.
RUN apt-get update \
    && apt-get install -y --no-install-recommends tini=0.19.0-1+b3 \
    && rm -rf /var/lib/apt/lists/*

# A fixed numeric UID so runAsNonRoot-style policies can verify it.
RUN groupadd --system --gid 10001 app \
    && useradd --system --uid 10001 --gid app --home-dir /home/app --create-home \
        --shell /usr/sbin/nologin app

ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    HOME=/home/app \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    CHATGATE_LISTEN=0.0.0.0:8000 \
    CHATGATE_BACKEND=http://127.0.0.1:8080 \
    CHATGATE_WORKERS=1 \
    BACKEND_HEALTH_URL=http://127.0.0.1:8080/health

# The Chainlit app to ship; requirements.txt must list chainlit.
ARG APP_DIR=examples/chainlit
COPY ${APP_DIR}/requirements.txt /tmp/requirements.txt
RUN python -m venv /opt/venv \
    && pip install --no-cache-dir -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

COPY --from=builder /build/target/release/chatgate /usr/local/bin/chatgate
COPY entrypoint.sh /usr/local/bin/entrypoint.sh
# Strip CRs in case of a Windows checkout (core.autocrlf), which bash refuses to run.
RUN sed -i 's/\r$//' /usr/local/bin/entrypoint.sh \
    && chmod 0755 /usr/local/bin/entrypoint.sh /usr/local/bin/chatgate

WORKDIR /app
# Chainlit treats its app directory as a workspace: on start it writes .chainlit/ (config.toml,
# translations), chainlit.md and .files/ (uploads) there, and deletes .files/ on shutdown, so the
# directory itself must be writable, not only those paths. With several workers chatgate also
# writes /app/.chatgate/worker-<i>/ (each worker's own app root: links to the app, its own
# .files). All of it belongs to the app user; nothing else at run time needs to be writable.
COPY --chown=app:app ${APP_DIR}/ /app/
RUN mkdir -p /app/.chainlit /app/.files \
    && chown app:app /app /app/.chainlit /app/.files

USER 10001:10001
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=40s --retries=3 \
    CMD ["chatgate", "healthcheck"]
# bash runs the script, so a lost exec bit (Windows checkouts) doesn't matter.
ENTRYPOINT ["/usr/bin/tini", "--", "bash", "/usr/local/bin/entrypoint.sh"]
