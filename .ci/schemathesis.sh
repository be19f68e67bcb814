#!/usr/bin/env bash
# Installs schemathesis (the property-based API fuzzer, from PyPI) into a cache directory
# outside the clone when it is missing, and prints the path of its binary.
#   .ci/schemathesis.sh
exec "$(dirname "$0")/pip-tool.sh" schemathesis 4.32.5 st
