#!/usr/bin/env bash
# Throughput of the bootstrap server (docs/benchmarks.md): announces processed
# per second and list requests per second, with N requests in flight.
#   bench/bootstrap_bench.sh BUILD_DIR [CLIENTS] [SECONDS]
# It sets up a real overlay in a temporary directory (login server, one
# enrolled super node listening for the address check, the bootstrap server),
# measures with bench/https_load, and stops everything it started.
set -euo pipefail
build=${1:?usage: bootstrap_bench.sh BUILD_DIR [CLIENTS] [SECONDS]}
clients=${2:-16}
seconds=${3:-5}
build=$(cd "$build" && pwd)
dir=$(mktemp -d /tmp/bootstrap-bench-XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  rm -rf "$dir"
}
trap cleanup EXIT INT TERM
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_log() { for _ in $(seq 200); do grep -q "$2" "$1" 2>/dev/null && return 0; sleep 0.05; done; echo "no '$2' in $1" >&2; exit 1; }

ls_port=$(free_port); sn_port=$(free_port); bs_port=$(free_port)
ov=bench.p2psip
ls=("$build/loginserver/loginserver" -o overlay=$ov -o listen=127.0.0.1:$ls_port
    -o state_dir=$dir/ls -o pbkdf2_iterations=1000)
pin=$("${ls[@]}" init | sed -n 's/^CA pin: //p')
echo "sn1-bench-password" | "${ls[@]}" user add sn1 >/dev/null
"${ls[@]}" issue --service 127.0.0.1 --out "$dir/svc" >/dev/null
"${ls[@]}" -d >"$dir/ls.log" 2>&1 & pids+=($!)
wait_log "$dir/ls.log" "serving on"
echo "sn1-bench-password" | "$build/supernode/supernode" -o state_dir="$dir/sn1" enroll \
  --login https://127.0.0.1:$ls_port --pin "$pin" --user sn1 >"$dir/enroll.txt"
nid=$(sed -n 's/.*node-id \([0-9a-f]\{40\}\).*/\1/p' "$dir/enroll.txt")
"$build/supernode/supernode" -d -o overlay=$ov -o listen=127.0.0.1:$sn_port -o state_dir="$dir/sn1" \
  -o ca_file="$dir/sn1/ca.pem" -o cert_file="$dir/sn1/cert.pem" -o key_file="$dir/sn1/key.pem" \
  >"$dir/sn.log" 2>&1 & pids+=($!)
wait_log "$dir/sn.log" "listening on"
"$build/bootstrap/bootstrap" -d -o overlay=$ov -o listen=127.0.0.1:$bs_port -o state_dir="$dir/bs" \
  -o ca_file="$dir/ls/ca.pem" -o cert_file="$dir/svc/127.0.0.1.pem" -o key_file="$dir/svc/127.0.0.1.key" \
  -o announce_period_s=30 -o max_announces=100000000 -o log_level=warn -v >"$dir/bs.log" 2>&1 & pids+=($!)
wait_log "$dir/bs.log" "serving on"

load=("$build/bench/https_load" -c "$clients" -s "$seconds")
url=https://127.0.0.1:$bs_port
body="{\"node_id\":\"$nid\",\"address\":\"127.0.0.1:$sn_port\",\"attached\":10,\"capacity\":100,\"uptime_s\":60}"
echo "bootstrap_bench: $clients in flight, ${seconds} s per phase, $(nproc) CPUs"
# The flood limit is lifted (max_announces) so that every announce is processed.
"${load[@]}" -H -n "announce (1 node, reused TLS)" -u $url/v1/announce -m POST -b "$body" \
  -a "$dir/ls/ca.pem" -C "$dir/sn1/cert.pem" -K "$dir/sn1/key.pem"
"${load[@]}" -n "list (reused TLS)" -u "$url/v1/supernodes?count=5" -a "$dir/ls/ca.pem"
"${load[@]}" -n "list (new TLS each)" -u "$url/v1/supernodes?count=5" -t
