#!/usr/bin/env bash
# make bench-scale: wasmhook-bench against one, then two hosts sharing a NATS JetStream journal
# and Redis dedup, all on loopback (closed loop, 32 connections, 10 s each). The servers come
# from `make services`; everything lives in a temporary folder removed at the end.
set -euo pipefail
cd "$(dirname "$0")/../.."
work=$(mktemp -d)
pids=()
# Stops the hosts before the servers they use (the reverse of starting), so that no host logs
# a server going away, then removes the folder.
cleanup() {
  for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
    kill "${pids[i]}" 2>/dev/null || true
    wait "${pids[i]}" 2>/dev/null || true
  done
  rm -rf "$work"
}
trap cleanup EXIT

# Polls until `$@` succeeds, for at most 30 s.
ready() { for _ in $(seq 150); do "$@" >/dev/null 2>&1 && return 0; sleep 0.2; done; echo "not ready: $*" >&2; exit 1; }

nats_port=14222; nats_monitor=18222; redis_port=16379
target/services/bin/nats-server -js -a 127.0.0.1 -p $nats_port -m $nats_monitor -sd "$work/nats" >/dev/null 2>&1 &
pids+=($!)
redis-server --port $redis_port --bind 127.0.0.1 --save "" --appendonly no --dir "$work" >/dev/null & pids+=($!)
ready curl -sf "http://127.0.0.1:$nats_monitor/healthz?js-enabled-only=true"
ready redis-cli -p $redis_port ping

host() { # host N: a wasmhook on 127.0.0.1:1808N (admin 1909N) with the example plugins
  cat >"$work/host$1.toml" <<TOML
listen = "127.0.0.1:1808$1"
admin_listen = "127.0.0.1:1909$1"
plugins_dir = "$PWD/target/plugins"
data_dir = "$work/data$1"
[journal]
backend = "nats"
url = "nats://127.0.0.1:$nats_port"
[dedup]
backend = "redis"
url = "redis://127.0.0.1:$redis_port"
[sources.github]
verify = "github"
secret_env = "GITHUB_WEBHOOK_SECRET"
# Under the NATS server's default max_payload (1 MiB), so that the host has nothing to warn of.
max_body_bytes = 262144
TOML
  GITHUB_WEBHOOK_SECRET=dev-secret RUST_LOG=warn ./target/release/wasmhook serve --config "$work/host$1.toml" &
  pids+=($!)
}

host 1
ready curl -sf http://127.0.0.1:19091/readyz
echo "== one host on NATS JetStream + Redis"
./target/release/wasmhook-bench --connections 32 --duration 10s \
  --url http://127.0.0.1:18081/hooks/github --admin http://127.0.0.1:19091 --json target/bench-nats-1.json
host 2
ready curl -sf http://127.0.0.1:19092/readyz
echo "== two hosts on the same stream, connections spread over both"
./target/release/wasmhook-bench --connections 32 --duration 10s \
  --url http://127.0.0.1:18081/hooks/github,http://127.0.0.1:18082/hooks/github \
  --admin http://127.0.0.1:19091,http://127.0.0.1:19092 --json target/bench-nats-2.json
