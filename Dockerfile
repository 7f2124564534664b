# syntax=docker/dockerfile:1
# The operator's image: built with the official Rust image, run on distroless
# as the nonroot user (65532), which the Helm chart's pod security expects.
#
#   docker build -t ghcr.io/amicopy-dev/ami-copy-operator:0.1.0 .

FROM rust:1-bookworm AS build
WORKDIR /src
# The whole workspace: cargo reads every member's manifest (tests/ec2-sim).
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin ami-copy-operator \
 && cp target/release/ami-copy-operator /ami-copy-operator

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /ami-copy-operator /ami-copy-operator
USER 65532:65532
# /metrics, /livez and /readyz (--metrics-addr).
EXPOSE 8080
ENTRYPOINT ["/ami-copy-operator"]
CMD ["run"]
