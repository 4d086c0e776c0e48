# The operator image: a static binary on an empty base, running as a non-root user.
#   docker build -t prefect-agent-operator:dev .
FROM rust:1-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends musl-tools \
    && rm -rf /var/lib/apt/lists/* \
    && rustup target add x86_64-unknown-linux-musl
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY crds ./crds
# A workspace member (the tests' harness): Cargo reads its manifest to resolve the build.
COPY testkit ./testkit
RUN cargo build --release --locked --target x86_64-unknown-linux-musl \
    && cp target/x86_64-unknown-linux-musl/release/prefect-agent-operator /prefect-agent-operator

FROM scratch
# TLS to Prefect Cloud verifies against the system roots.
COPY --from=build /etc/ssl/certs/ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
COPY --from=build /prefect-agent-operator /prefect-agent-operator
# Matches the chart's podSecurityContext (runAsUser/runAsGroup 65532).
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/prefect-agent-operator"]
CMD ["operator"]
