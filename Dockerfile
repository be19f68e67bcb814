# tunnox: one image for every role (`tunnox controller`, `tunnox proxy`, `tunnox agent`).
# Built by `make image` (buildah, no registry needed): the build context is a staged root file
# system holding the release binary and exactly the shared libraries `ldd` lists for it
# (the dynamic loader, libc, libgcc_s), copied from the build host so they always match what
# the binary was linked against. TLS roots are compiled in (rustls + webpki-roots).
FROM scratch
COPY rootfs/ /
USER 65532:65532
EXPOSE 8080 9090 9091
ENTRYPOINT ["/tunnox"]
