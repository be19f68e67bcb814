#!/usr/bin/env bash
# Installs checkov (the Kubernetes manifest security scanner, from PyPI) into a cache directory
# outside the clone when it is missing, and prints the path of its binary.
#   .ci/checkov.sh
exec "$(dirname "$0")/pip-tool.sh" checkov 3.3.30 checkov
