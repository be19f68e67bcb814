# The make targets are the project's interface: see README.md.
CARGO ?= cargo
export CARGO_TERM_COLOR ?= never

.PHONY: all build deps test lint bench generate check-generated run help

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

generate: ## regenerate checked-in generated files (crds/, the chart's CRDs)
	$(CARGO) run --locked --quiet -- crd > crds/tunnox.yaml
	mkdir -p charts/tunnox/crds
	cp crds/tunnox.yaml charts/tunnox/crds/tunnox.yaml

check-generated: generate ## fail when a generated file is stale
	@git diff --exit-code -- crds charts/tunnox/crds || { echo "generated files are stale: run 'make generate' and commit"; exit 1; }
	@test -z "$$(git status --porcelain -- crds charts/tunnox/crds)" || { echo "generated files are not committed: run 'make generate' and commit"; git status --short -- crds charts/tunnox/crds; exit 1; }

run: build ## validate the example single-node configuration (the proxy is not built yet)
	@echo "tunnox today: configuration model and mapping store. The proxy and controller are not built yet."
	./$${CARGO_TARGET_DIR:-target}/release/tunnox --config examples/single-node.yaml check-config
