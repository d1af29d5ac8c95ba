#!/usr/bin/env bash
# Installs the Debian 12 packages p2psip needs to build and test, if missing.
# Safe to run repeatedly: it only calls apt-get when something is absent.
set -euo pipefail

PACKAGES=(
  build-essential cmake pkg-config python3
  libev-dev libgnutls28-dev gnutls-bin libjansson-dev libcurl4-gnutls-dev
  libnice-dev libsodium-dev libmicrohttpd-dev libosip2-dev libsqlite3-dev libcmocka-dev
  sip-tester valgrind curl nftables iproute2
  # tests/integration/test_sip_front_attack.py: an attacker's toolkit (svwar, svcrack)
  sipvicious
  # the TURN and STUN tests and bench/turn_bench.py: clients nobody here wrote
  # (turnutils_uclient, turnutils_peer, turnutils_stunclient; stun), coturn as the reference
  coturn stun-client
  # tests/integration/test_netlab_media.py: real phones (baresip), tones and their analysis
  # (sox), and where packets were when (tcpdump, for the latency the nodes add)
  baresip-core sox tcpdump
  # scripts/fuzz.sh: libFuzzer's runtime is in libclang-rt-dev, which clang only recommends
  clang libclang-rt-dev
)

missing=()
for p in "${PACKAGES[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done
[ ${#missing[@]} -eq 0 ] && exit 0

echo "deps: installing ${missing[*]}" >&2
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null || { echo "deps: need root (or sudo) to install: ${missing[*]}" >&2; exit 1; }
  SUDO=sudo
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
