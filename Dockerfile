# tunnox: one image for every role (`tunnox controller`, `tunnox proxy`, `tunnox agent`).
#
#   cargo build --release --locked
#   docker build --build-arg BINARY=target/release/tunnox -t tunnox:0.1.0 .
#
# The final image is FROM scratch: no shell, no package manager, nothing but the binary and what
# it needs to start. TLS roots are compiled in (rustls + webpki-roots), so no CA bundle is needed.
#
# A FROM scratch image has no dynamic loader. A statically linked binary (e.g. built for
# x86_64-unknown-linux-musl) needs nothing else. The default `cargo build --release` on the
# Debian 12 build host is glibc-linked (`ldd target/release/tunnox`):
#   /lib64/ld-linux-x86-64.so.2              (the dynamic loader)
#   /lib/x86_64-linux-gnu/libc.so.6          (glibc 2.36; NSS files/dns are built into libc since 2.34)
#   /lib/x86_64-linux-gnu/libgcc_s.so.1      (unwinding)
# Those three are copied from the Debian release the binary was built on, so that the glibc in
# the image is never older than the one the binary was linked against. A static binary runs the
# same way; the libraries are then unused. x86_64 only (the paths are the amd64 ones).
ARG LIBS_IMAGE=debian:bookworm-slim

FROM ${LIBS_IMAGE} AS libs

FROM scratch
ARG BINARY=tunnox
COPY --from=libs /lib64/ld-linux-x86-64.so.2 /lib64/ld-linux-x86-64.so.2
COPY --from=libs /lib/x86_64-linux-gnu/libc.so.6 /lib/x86_64-linux-gnu/libc.so.6
COPY --from=libs /lib/x86_64-linux-gnu/libgcc_s.so.1 /lib/x86_64-linux-gnu/libgcc_s.so.1
COPY ${BINARY} /tunnox
USER 65532:65532
EXPOSE 8080 9090 9091
ENTRYPOINT ["/tunnox"]
