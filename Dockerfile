# Every Unhidra binary in one small image; docker-compose.yml and the Helm
# chart pick the binary per service. Build: docker build -t unhidra .

ARG RUST_VERSION=1.95

# cargo-chef turns the manifests into a recipe, so the dependency layer below
# is rebuilt only when Cargo.toml or Cargo.lock change, not on every edit.
FROM rust:${RUST_VERSION}-slim-bookworm AS chef
RUN cargo install cargo-chef --locked --version 0.1.78
WORKDIR /src

FROM chef AS planner
COPY . .
RUN cargo chef prepare --recipe-path recipe.json

FROM chef AS build
# Release binaries without symbols: a smaller image.
ENV CARGO_PROFILE_RELEASE_STRIP=symbols
COPY --from=planner /src/recipe.json recipe.json
RUN cargo chef cook --release --locked --recipe-path recipe.json
COPY . .
RUN cargo build --release --locked --bins \
 && mkdir -p /out/bin /out/home/data \
 && cp target/release/unhidra target/release/gateway-service target/release/auth-api \
       target/release/chat-service target/release/history-service target/release/audit-service /out/bin/

# The runtime: glibc, libgcc and CA certificates; no shell, no package
# manager. User 65532 (nonroot) owns only its data directory.
FROM gcr.io/distroless/cc-debian12:nonroot AS runtime
COPY --from=build /out/bin/ /usr/local/bin/
COPY --from=build --chown=65532:65532 /out/home/ /var/lib/unhidra/
USER 65532:65532
WORKDIR /var/lib/unhidra
ENV UNHIDRA_BIND=0.0.0.0:9000 \
    UNHIDRA_DATA_DIR=/var/lib/unhidra/data \
    UNHIDRA_LOG_FORMAT=json
EXPOSE 9000
# Each binary answers `healthcheck` by asking its own /healthz on the port of
# UNHIDRA_BIND (no curl needed in the image).
HEALTHCHECK --interval=10s --timeout=4s --start-period=10s --retries=3 \
  CMD ["unhidra", "healthcheck"]
CMD ["unhidra"]
