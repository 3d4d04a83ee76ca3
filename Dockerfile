# syntax=docker/dockerfile:1
#
# command-trigger as a sidecar image: one static binary on Alpine, so `run(...)` in a script has a
# POSIX shell (busybox sh) and the usual tools (kill, pkill, cat, df, ...).
#
#   docker build -t command-trigger .
#   docker build --build-arg EXTRA_PACKAGES="git curl" -t command-trigger:tools .
#   docker run --rm -p 9000:9000 -e TOKEN=change-me-to-16-bytes-or-more \
#       command-trigger --token-env TOKEN
#
# Stopping drains: running handlers and jobs get --shutdown-timeout (20 s by default) after
# SIGTERM, so give `docker stop -t` / `podman stop -t` more than that (e.g. `docker stop -t 30`),
# as a pod's terminationGracePeriodSeconds must be; at Docker's default of 10 s the drain is cut
# short by SIGKILL.
#
# The default script is the quick-start handler; mount your own at
# /etc/command-trigger/handler.rhai (a ConfigMap volume in Kubernetes), or point CT_SCRIPT elsewhere.

ARG RUST_VERSION=1.95
ARG ALPINE_VERSION=3.22

# ---- build: a fully static binary (musl libc, no dynamic loader needed) ----
FROM rust:${RUST_VERSION}-alpine AS build
WORKDIR /src
# Dependencies first, in their own layer, so editing the sources does not download the crates again.
COPY Cargo.toml Cargo.lock ./
# The linker flags of the static build (packed relocations: a smaller binary, still PIE).
COPY .cargo ./.cargo
# An empty crate root is enough for cargo to read the manifest; the real sources replace it.
RUN mkdir src && touch src/lib.rs && cargo fetch --locked
COPY src ./src
# The host of this image is `<arch>-unknown-linux-musl`; naming the target explicitly keeps the
# output path and the static linking the same on amd64 and arm64. The build fails if anything
# dynamic slipped in (a NEEDED entry or a program interpreter).
RUN --mount=type=cache,target=/src/target \
    target="$(uname -m)-unknown-linux-musl" \
    && cargo build --release --locked --offline --target "$target" \
    && cp "target/$target/release/command-trigger" /command-trigger \
    && readelf -dl /command-trigger > /tmp/elf.txt \
    && if grep -Eq 'NEEDED|INTERP' /tmp/elf.txt; then \
         echo "command-trigger is not static" >&2; exit 1; \
       fi \
    && /command-trigger --version

# ---- runtime: Alpine for busybox sh and the tools scripts call ----
FROM alpine:${ALPINE_VERSION}
# Extra Alpine packages the handlers need, e.g. "git curl" for scripts/git-pull.rhai and
# scripts/cache-flush.rhai. Empty by default to keep the image small.
ARG EXTRA_PACKAGES=""
# hadolint ignore=DL3018,SC2086
RUN if [ -n "$EXTRA_PACKAGES" ]; then apk add --no-cache $EXTRA_PACKAGES; fi \
    && addgroup -S -g 10001 command-trigger \
    && adduser -S -D -H -u 10001 -G command-trigger -s /sbin/nologin command-trigger
COPY --from=build /command-trigger /usr/local/bin/command-trigger
# The ready handlers, to copy or point CT_SCRIPT at; the quick-start one is the default script.
COPY scripts/ /usr/share/command-trigger/scripts/
COPY scripts/demo.rhai /etc/command-trigger/handler.rhai

# Every serve flag has a CT_ variable; these make `serve` work with no flag but a token source.
ENV CT_SCRIPT=/etc/command-trigger/handler.rhai \
    CT_LISTEN=0.0.0.0:9000
EXPOSE 9000
# Numeric, so Kubernetes can verify runAsNonRoot without reading /etc/passwd.
USER 10001:10001
# The server reaps orphans itself when it runs as PID 1, so no init is needed in front of it.
ENTRYPOINT ["command-trigger", "serve"]
