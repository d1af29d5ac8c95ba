#!/usr/bin/env bash
# Configures and builds one flavour of the tree.
#   scripts/build.sh [normal|asan] -> build/ or build-asan/
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
flavour=${1:-normal}
case "$flavour" in
  normal) dir="$top/build"; extra=() ;;
  asan)   dir="$top/build-asan"; extra=(-DP2P_SANITIZE=ON -DCMAKE_BUILD_TYPE=Debug) ;;
  release) dir="$top/build-release"; extra=(-DCMAKE_BUILD_TYPE=Release) ;;
  *) echo "build.sh: unknown flavour '$flavour' (normal, asan, release)" >&2; exit 2 ;;
esac
cmake -S "$top" -B "$dir" "${extra[@]}" >/dev/null
cmake --build "$dir" -j "$(nproc)" >/dev/null
echo "$dir"
