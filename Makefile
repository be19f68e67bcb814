# The make targets are the project's interface: see README.md.
CARGO ?= cargo
export CARGO_TERM_COLOR ?= never

.PHONY: all build deps test lint bench generate run help

all: build

help: ## list targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | sed 's/:.*##/\t/'

build: ## build the tunnox binary (release)
	$(CARGO) build --release --locked

deps: ## install the system packages tests need (redis-server, openssl)
	@.ci/deps.sh

test: deps ## unit tests, store conformance against real redis-server, config and fuzz tests
	$(CARGO) test --locked

lint: ## rustfmt, clippy with warnings as errors
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --locked --all-targets -- -D warnings

bench: deps ## run benchmarks and write docs/benchmarks.md
	benches/run.sh docs/benchmarks.md

generate: ## regenerate checked-in generated files
	@echo "nothing to generate yet: crds/ and manifests/ are produced once the CRD types and the chart exist"

run: build ## validate the example single-node configuration (the proxy is not built yet)
	@echo "tunnox today: configuration model and mapping store. The proxy and controller are not built yet."
	./$${CARGO_TARGET_DIR:-target}/release/tunnox --config examples/single-node.yaml check-config
