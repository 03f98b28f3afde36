# The ebb binary. Built from the repository root: docker build -f compose/ebb.Dockerfile .
FROM rust:1.95-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends libssl-dev && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --release -p ebb

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates libssl3 && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/ebb /usr/local/bin/ebb
EXPOSE 9470
ENTRYPOINT ["/usr/local/bin/ebb"]
