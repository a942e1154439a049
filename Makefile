# aws-multi-eni: developer entry points. `make help` lists them.
#
# Everything built lives outside the checkout, in $(ENI_CACHE_DIR) (cargo target dir,
# Go caches, peer binaries), so fresh clones and CI runs reuse earlier work.

SHELL := /usr/bin/env bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help

ENI_CACHE_DIR ?= $(or $(XDG_CACHE_HOME),$(HOME)/.cache)/aws-multi-eni
export ENI_CACHE_DIR
export ENI_BIN_DIR := $(ENI_CACHE_DIR)/bin
export CARGO_TARGET_DIR ?= $(ENI_CACHE_DIR)/target
export CARGO_TERM_COLOR ?= never
# Tests never reach real AWS: no IMDS, no credentials from the environment.
export AWS_EC2_METADATA_DISABLED := true

CARGO ?= cargo

.PHONY: help
help: ## List the targets.
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-18s %s\n", $$1, $$2}'

.PHONY: demo
demo: peers build ## Run the whole system on this machine (no AWS account, no cluster).
	@hack/demo.sh

.PHONY: demo-dra
demo-dra: peers build ## The demo with the DPDK ENIs served through DRA (ResourceSlices, a claim kube-scheduler allocates, prepared by the kubelet, its network data).
	@hack/demo.sh up --dra

.PHONY: demo-down
demo-down: ## Stop whatever a demo left running.
	@hack/demo.sh down

.PHONY: test
test: peers fmt-check lint test-unit release test-integration ## Everything CI runs: peers, fmt, clippy, unit tests, the release build the images run, integration tests.

.PHONY: peers
peers: ## Build or fetch the real test peers into the cache (idempotent).
	@hack/peers.sh

.PHONY: build
build: ## Build all binaries (debug; eni-manager with the test-util feature the demo needs).
	$(CARGO) build --workspace --locked --bins
	$(CARGO) build --locked -p eni-node --bins --features test-util

.PHONY: release
release: ## Release build of the binaries the Dockerfiles ship (what they run).
	$(CARGO) build --release --locked -p eni-controller -p eni-node -p cni-helper

.PHONY: fmt
fmt: ## Format the Rust code.
	$(CARGO) fmt --all

.PHONY: fmt-check
fmt-check: ## Check formatting.
	$(CARGO) fmt --all -- --check

.PHONY: lint
lint: ## clippy with warnings as errors.
	$(CARGO) clippy --workspace --all-targets --locked -- -D warnings

.PHONY: test-unit
test-unit: ## Unit tests: no root, no network, no peers.
	$(CARGO) test --workspace --locked

.PHONY: test-integration
test-integration: peers ## Integration tests against the real peers (root for network namespaces).
	$(CARGO) test --workspace --locked -- --ignored --test-threads=4

.PHONY: crd
crd: ## Regenerate the committed CRD from the Rust types.
	$(CARGO) run -q -p eni-api --example print-crd > charts/aws-multi-eni-controller/crds/nodeenis.networking.k8s.aws.yaml

.PHONY: chart-docs
chart-docs: peers ## Regenerate the charts' README values tables from the values.yaml comments (helm-docs).
	"$(ENI_BIN_DIR)/helm-docs" --chart-search-root charts --sort-values-order file --log-level warning

.PHONY: clean-cache
clean-cache: ## Remove the build cache (peers, target dir, Go caches).
	rm -rf $(ENI_CACHE_DIR)
