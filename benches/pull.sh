#!/usr/bin/env bash
# Pull-through figures: `contentd bench-pull` against Debian's docker-registry on loopback.
#
#   benches/pull.sh [RUNS]
#
# Starts a registry (shared/images/registry.sh) with the fixtures and a synthetic image with
# a 1 GiB layer, a contentd with --gc-grace-secs 0 (the bench collects between runs), runs
# the bench, and stops both. Needs docker-registry, skopeo, umoci, jq, curl.
# CONTENTD_BIN=path runs that binary instead of this checkout's release build (for A/B
# runs: alternate two binaries, one run each, and compare within one sitting).
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-5}
SHARED=${CONTENTD_SHARED:-}
[ -n "$SHARED" ] || for d in ../shared /work/shared; do [ -d "$d/images" ] && { SHARED=$d; break; }; done
W=${BENCH_WORK:-/tmp/contentd-bench-pull}
export IMGWORK=$W REGISTRY_ADDR=127.0.0.1:5066
BIN=${CONTENTD_BIN:-$(cargo build --release -q --message-format=json 2>/dev/null | jq -r 'select(.executable != null and .target.name == "contentd") | .executable' | tail -1)}
mkdir -p "$W"

[ -f "$W/fixtures/summary.json" ] || bash "$SHARED/images/make-fixtures.sh" "$W/fixtures" >/dev/null
bash "$SHARED/images/registry.sh" start
bash "$SHARED/images/registry.sh" push "$W/fixtures" >/dev/null 2>&1

# (distribution answers 404 for an OCI manifest unless the Accept header names its type)
if ! curl -fsS -o /dev/null -H "Accept: application/vnd.oci.image.manifest.v1+json" \
    "http://$REGISTRY_ADDR/v2/bench/big/manifests/1g"; then
  B=$W/big; rm -rf "$B"; mkdir -p "$B/blobs/sha256"
  head -c 1G /dev/urandom > "$B/layer"
  ld=$(sha256sum "$B/layer" | cut -d' ' -f1); mv "$B/layer" "$B/blobs/sha256/$ld"
  printf '{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":["sha256:%s"]}}' "$ld" > "$B/config"
  cd_=$(sha256sum "$B/config" | cut -d' ' -f1); cs=$(stat -c %s "$B/config"); mv "$B/config" "$B/blobs/sha256/$cd_"
  printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:%s","size":%s},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"sha256:%s","size":%s}]}' \
    "$cd_" "$cs" "$ld" $((1 << 30)) > "$B/manifest"
  md=$(sha256sum "$B/manifest" | cut -d' ' -f1); ms=$(stat -c %s "$B/manifest"); mv "$B/manifest" "$B/blobs/sha256/$md"
  printf '{"schemaVersion":2,"manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:%s","size":%s,"annotations":{"org.opencontainers.image.ref.name":"1g"}}]}' "$md" "$ms" > "$B/index.json"
  echo '{"imageLayoutVersion":"1.0.0"}' > "$B/oci-layout"
  echo '{"default":[{"type":"insecureAcceptAnything"}]}' > "$W/policy.json"
  skopeo --policy "$W/policy.json" copy -q --dest-tls-verify=false "oci:$B:1g" "docker://$REGISTRY_ADDR/bench/big:1g"
  rm -rf "$B"
fi

rm -rf "$W/contentd"; mkdir -p "$W/contentd"
"$BIN" serve --root "$W/contentd/root" --socket "$W/contentd/c.sock" --gc-grace-secs 0 --gc-interval-secs 0 \
  2> "$W/contentd/log" &
PID=$!
trap 'kill $PID 2>/dev/null; wait $PID 2>/dev/null; bash "$SHARED/images/registry.sh" stop' EXIT
for _ in $(seq 100); do [ -S "$W/contentd/c.sock" ] && break; sleep 0.1; done
"$BIN" bench-pull --socket "$W/contentd/c.sock" --runs "$RUNS" \
  --reference "$REGISTRY_ADDR/fixtures/single:oci" --big-reference "$REGISTRY_ADDR/bench/big:1g"
