# The image the Helm chart runs: the static binaries, nothing else.
#   make build && docker build -t ghcr.io/childflow/childflow:0.1.0 .
FROM scratch
COPY bin/childflow bin/childflow-init bin/childflow-cni bin/childflow-hook bin/childflow-runtime /usr/local/bin/
ENTRYPOINT ["/usr/local/bin/childflow"]
CMD ["daemon"]
