# The `neruba` image: every component is a subcommand (gateway, aggregator, rater).
#   docker build -t neruba:0.1.0 .
FROM rust:1.95-bookworm AS build
# RocksDB (bindgen needs libclang) and the bundled librdkafka are compiled from source.
RUN apt-get update \
    && apt-get install -y --no-install-recommends clang libclang-dev cmake make g++ \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p neruba --bin neruba \
    && cp target/release/neruba /usr/local/bin/neruba

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --uid 10001 --user-group --no-create-home neruba \
    && mkdir -p /var/lib/neruba && chown neruba:neruba /var/lib/neruba
COPY --from=build /usr/local/bin/neruba /usr/local/bin/neruba
USER 10001
ENV NERUBA_LOG=info
# No transparent huge pages for the allocator, also on hosts whose THP setting is `always`
# (their 2 MiB pages doubled some components' RSS; see README "Performance").
ENV MIMALLOC_ALLOW_THP=0
EXPOSE 8080 9090
ENTRYPOINT ["/usr/local/bin/neruba"]
CMD ["--help"]
