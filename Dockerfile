# sluice container image. The build machine has no Docker engine: .ci/run
# builds the binary from exactly the files the build stage copies, so the
# build stage cannot miss one; the image itself is not built there.
# Build: docker build -t sluice .
# Run (the built-in config reads these three variables):
#   docker run -p 8080:8080 -e SLUICE_LISTEN=0.0.0.0:8080 \
#     -e OPENAI_API_KEY=sk-... -e CLIENT_KEY=your-client-key -e ADMIN_TOKEN=an-admin-token sluice
# Or your own config: -v $PWD/config:/etc/sluice:ro (see `sluice init`).
#
# Stage 1: build a release binary.
FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
# The manifest names the bench target: cargo refuses a manifest whose target is missing.
COPY benches ./benches
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
