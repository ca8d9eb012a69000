# crossbatch — the README's two commands are `make run` and `make test`.
# Every target first runs scripts/setup.sh (idempotent): torch 2.11.0 in .venv, Fashion-MNIST.

export VIRTUAL_ENV := $(CURDIR)/.venv
export PATH := $(CURDIR)/.venv/bin:$(PATH)
export LIBTORCH_USE_PYTORCH := 1

CARGO ?= cargo
ARGS ?=
# Extra `cargo test` arguments for `make test`, before its `--` (e.g. TEST_ARGS=--lib).
TEST_ARGS ?=

.PHONY: setup build run test bench lint fmt device-stage

setup:
	@./scripts/setup.sh

## Release binary at target/release/crossbatch.
build: setup
	$(CARGO) build --release

## Start the server on the shipped default model (config/default.toml).
run: build
	./target/release/crossbatch serve $(ARGS)

## The whole test suite (unit + integration, real server, real Fashion-MNIST).
test: setup
	$(CARGO) test --release $(TEST_ARGS) -- --test-threads=2

## Benchmarks: model vs HTTP embedding throughput, HNSW vs brute force search.
bench: build
	./target/release/crossbatch bench $(ARGS)

lint: setup
	$(CARGO) fmt --check
	$(CARGO) clippy --release --all-targets -- -D warnings
	RUSTDOCFLAGS="-D warnings" $(CARGO) doc --release --no-deps

## Stage the binaries and data of the GPU check into .device/ (README, "GPU check").
device-stage: setup
	./scripts/device_stage.sh
