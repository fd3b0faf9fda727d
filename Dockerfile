# sluice container image. UNTESTED here: the build machine has no Docker engine.
# Build: docker build -t sluice .
# Run:   docker run -p 8080:8080 -v $PWD/config:/etc/sluice:ro -e SLUICE_LISTEN=0.0.0.0:8080 sluice
#
# Stage 1: build a release binary.
FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
RUN cargo build --release --locked --bin sluice

# Stage 2: a small runtime (no CA bundle needed: webpki roots are compiled in), non-root.
FROM debian:bookworm-slim
RUN useradd --system --no-create-home --shell /usr/sbin/nologin sluice \
 && mkdir -p /etc/sluice /var/log/sluice && chown sluice:sluice /var/log/sluice
COPY --from=build /src/target/release/sluice /usr/local/bin/sluice
COPY config/sluice.toml /etc/sluice/sluice.toml
USER sluice
ENV SLUICE_CONFIG=/etc/sluice/sluice.toml
EXPOSE 8080
STOPSIGNAL SIGTERM
# Liveness: have the orchestrator probe GET /health (503 while draining).
ENTRYPOINT ["/usr/local/bin/sluice"]
CMD ["serve"]
