#!/usr/bin/env bash
# Registry figures: `contentd bench-registry` against Debian's docker-registry on loopback.
#
#   benches/registry.sh [RUNS]
#
# Starts a registry (shared/images/registry.sh) holding the fixtures, a contentd serving the
# distribution API with that registry as its upstream and --gc-grace-secs 0 (the bench
# collects between miss runs), runs the bench on the 50 MiB fixture layer, and stops both.
# CONTENTD_BIN=path runs that binary instead of this checkout's release build (for A/B
# runs: alternate two binaries, one run each, and compare within one sitting).
set -euo pipefail
cd "$(dirname "$0")/.."
# 15 miss runs by default: with 5, one build's whole-layer ratio (a median of 5 ~50-80 ms
# transfers) ranged 1.14x-1.97x over four sittings on this 2-core machine.
RUNS=${1:-15}
SHARED=${CONTENTD_SHARED:-}
[ -n "$SHARED" ] || for d in ../shared /work/shared; do [ -d "$d/images" ] && { SHARED=$d; break; }; done
W=${BENCH_WORK:-/tmp/contentd-bench-registry}
export IMGWORK=$W REGISTRY_ADDR=127.0.0.1:5067
CD_ADDR=127.0.0.1:5068
BIN=${CONTENTD_BIN:-$(cargo build --release -q --message-format=json 2>/dev/null | jq -r 'select(.executable != null and .target.name == "contentd") | .executable' | tail -1)}
mkdir -p "$W"
[ -f "$W/fixtures/summary.json" ] || bash "$SHARED/images/make-fixtures.sh" "$W/fixtures" >/dev/null
bash "$SHARED/images/registry.sh" start
bash "$SHARED/images/registry.sh" push "$W/fixtures" >/dev/null 2>&1

rm -rf "$W/contentd"; mkdir -p "$W/contentd"
cat > "$W/contentd/config.toml" <<TOML
registry_addr = "$CD_ADDR"
gc_grace_secs = 0
gc_interval_secs = 0
[upstream.registries."$REGISTRY_ADDR"]
endpoint = "http://$REGISTRY_ADDR"
TOML
"$BIN" serve --root "$W/contentd/root" --socket "$W/contentd/c.sock" --config "$W/contentd/config.toml" \
  >"$W/contentd/daemon.log" 2>&1 &
PID=$!
trap 'kill $PID 2>/dev/null; wait $PID 2>/dev/null; bash "$SHARED/images/registry.sh" stop' EXIT
for _ in $(seq 100); do [ -S "$W/contentd/c.sock" ] && curl -fsS -o /dev/null "http://$CD_ADDR/v2/" && break; sleep 0.1; done
"$BIN" --socket "$W/contentd/c.sock" bench-registry --registry "$CD_ADDR" --upstream "$REGISTRY_ADDR" \
  --image fixtures/single:oci --upstream-log "$W/registry/registry.log" --runs "$RUNS"
