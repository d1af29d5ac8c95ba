#!/usr/bin/env bash
# The Internet in a box: network namespaces with NAT routers, and the overlay running in them.
# Run as root (network namespaces, nftables); nothing in the root namespace is changed.
#   scripts/netlab.sh up [--no-overlay] [--state DIR] [--tag TAG]
#       builds the topology (docs/nat.md): inet (the Internet, 203.0.113.0/24), pub (login
#       server, bootstrap server, super nodes sn1-sn3), home-eim (endpoint-independent NAT),
#       home-sym1 and home-sym2 (symmetric NATs), office (one NAT, hosts lan1 and lan2),
#       pubhost (public address); then, unless --no-overlay, starts the overlay in it and
#       narrates: one ordinary node per host (alice, bob, carol, dave, erin, frank), its NAT,
#       super node and reflexive address; each host's phone (sipp at 127.0.0.1:5070 on its host) registers at
#       its node. ^C or a failure takes down what was built.
#   scripts/netlab.sh status [--state DIR]
#       namespaces and addresses, NAT types, daemons alive, each node's status
#   scripts/netlab.sh call [--state DIR] [-v] CALLER CALLEE
#       CALLER's phone calls CALLEE's user (sites: home-eim home-sym1 home-sym2 lan1 lan2
#       pubhost), CALLEE's phone answers; prints sipp's counters (-v: its screens) and the
#       nodes' channels
#   scripts/netlab.sh down [--state DIR] [--keep]
#       stops the daemons (by the pids in DIR/pids), deletes the namespaces, removes DIR
#       (--keep: keeps the logs and configurations in DIR)
# DIR (default /tmp/p2psip-netlab, or $NETLAB_STATE) holds pid files, logs, configurations
# and credentials. Binaries come from $P2P_BUILD_DIR, else build/ (built by scripts/build.sh
# when missing). A shell at a site: ip netns exec nl<TAG>-h-sym1 bash (names: see status).
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)

usage() { awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$0"; }
case "${1:-}" in
  -h|--help|help) usage; exit 0 ;;
  up|down|status|call) ;;
  "") usage >&2; exit 2 ;;
  *) echo "netlab.sh: unknown command '$1' (try --help)" >&2; exit 2 ;;
esac
cmd=$1
shift
for a in "$@"; do
  case "$a" in -h|--help) usage; exit 0 ;; esac
done
if [ "$(id -u)" -ne 0 ]; then
  echo "netlab.sh: needs root (network namespaces, nftables): sudo $0 $cmd $*" >&2
  exit 1
fi
for tool in ip nft python3; do
  command -v "$tool" >/dev/null || { echo "netlab.sh: $tool not found (Debian: iproute2 nftables python3)" >&2; exit 1; }
done

args=()
if [ "$cmd" = up ]; then
  build=${P2P_BUILD_DIR:-$top/build}
  missing=0
  for d in loginserver bootstrap supernode ordinarynode; do
    [ -x "$build/$d/$d" ] || missing=1
  done
  if [ $missing -eq 1 ]; then
    if [ -n "${P2P_BUILD_DIR:-}" ]; then
      echo "netlab.sh: the daemons are not built in $build" >&2
      exit 1
    fi
    echo "netlab.sh: building (scripts/build.sh normal)" >&2
    build=$("$top/scripts/build.sh" normal)
  fi
  args=(--bindir "$build")
fi
# exec: ^C and SIGTERM reach the Python process, which takes down what it built.
exec python3 "$top/tests/integration/netlab.py" "$cmd" "${args[@]}" "$@"
