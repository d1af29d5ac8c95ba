#!/usr/bin/env bash
# Coverage-guided fuzzing with libFuzzer, for a bounded time: builds fuzz_sip
# and fuzz_msg (tests/fuzz/) with clang, ASan and UBSan in build-fuzz/, then
# runs each on a temporary copy of its seed corpus (tests/fuzz/corpus/) and
# prints one line of statistics per target. Exits non-zero on a crash, leak,
# timeout or out-of-memory; the input that caused it is kept in
# build-fuzz/artifacts/ and its libFuzzer log in build-fuzz/fuzz_<target>.log.
#   scripts/fuzz.sh [--sip-seconds N] [--msg-seconds N] [-- LIBFUZZER_FLAG...]
#     --sip-seconds N   run fuzz_sip for N s (default 30, or $P2P_FUZZ_SIP_SECONDS)
#     --msg-seconds N   run fuzz_msg for N s (default 15, or $P2P_FUZZ_MSG_SECONDS)
#                       N = 0 skips that target
#     -- FLAG...        passed to both fuzzers (e.g. -seed=1 -only_ascii=1)
# Each input may take at most $P2P_FUZZ_TIMEOUT s (default 10). The corpus
# grown during the run is deleted at the end; the seed corpus is never written.
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
dir="$top/build-fuzz"

sip_s=${P2P_FUZZ_SIP_SECONDS:-30}
msg_s=${P2P_FUZZ_MSG_SECONDS:-15}
per_input=${P2P_FUZZ_TIMEOUT:-10}
extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    --sip-seconds) sip_s=${2:-}; shift 2 || { echo "fuzz.sh: $1 needs a value" >&2; exit 2; } ;;
    --msg-seconds) msg_s=${2:-}; shift 2 || { echo "fuzz.sh: $1 needs a value" >&2; exit 2; } ;;
    --) shift; extra=("$@"); break ;;
    -h|--help) sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "fuzz.sh: unknown option '$1' (try --help)" >&2; exit 2 ;;
  esac
done
for v in "$sip_s" "$msg_s" "$per_input"; do
  [[ "$v" =~ ^[0-9]+$ ]] || { echo "fuzz.sh: '$v' is not a number of seconds" >&2; exit 2; }
done

"$top/scripts/deps.sh"   # clang and its libFuzzer runtime

# A build-fuzz/ configured with another compiler cannot be switched to clang in place.
if [ -f "$dir/CMakeCache.txt" ] &&
   ! grep -q '^CMAKE_C_COMPILER:[A-Z]*=.*clang' "$dir/CMakeCache.txt"; then
  rm -rf "$dir"
fi
# -fsanitize=fuzzer-no-link on every file (libp2pcommon included) gives libFuzzer
# coverage of the code under test, not only of the fuzz target's own file.
echo "fuzz: building fuzz_sip and fuzz_msg with clang in build-fuzz/"
mkdir -p "$dir"
if ! { CC=clang cmake -S "$top" -B "$dir" -DP2P_FUZZ=ON -DP2P_SANITIZE=ON \
         -DCMAKE_C_FLAGS=-fsanitize=fuzzer-no-link &&
       cmake --build "$dir" --target fuzz_sip fuzz_msg -j2; } >"$dir/build.log" 2>&1; then
  tail -n 40 "$dir/build.log" >&2
  echo "fuzz: build failed (log: $dir/build.log)" >&2
  exit 1
fi

tmp=$(mktemp -d -t p2p-fuzz.XXXXXX)
pid=""
cleanup() {
  if [ -n "$pid" ]; then kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; fi
  rm -rf "$tmp"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

export ASAN_OPTIONS=detect_leaks=1:abort_on_error=0:strict_string_checks=1
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
mkdir -p "$dir/artifacts"

# The sanitizer's or libFuzzer's report from a log, without ASan's shadow-memory dump.
report() {
  awk '/^==[0-9]+== *ERROR|runtime error:|^ALARM|-- out-of-memory|^SUMMARY/ { on = 1 }
       /^Shadow bytes around/ { skip = 1 }
       /^==[0-9]+==ABORTING/ { skip = 0 }
       on && !skip && n++ < 80' "$1" | grep . || tail -n 40 "$1"
}

# run NAME SECONDS MAX_LEN
run() {
  local name=$1 secs=$2 max_len=$3 log="$dir/$1.log" rc=0
  [ "$secs" -gt 0 ] || return 0
  mkdir "$tmp/$name"
  cp "$top/tests/fuzz/corpus/${name#fuzz_}/"* "$tmp/$name/"
  # Started in the background so that an interrupted fuzz.sh can stop it by PID.
  "$dir/tests/$name" -max_total_time="$secs" -max_len="$max_len" -timeout="$per_input" \
    -rss_limit_mb=2048 -print_final_stats=1 -artifact_prefix="$dir/artifacts/$name-" \
    ${extra[@]+"${extra[@]}"} "$tmp/$name" </dev/null >"$log" 2>&1 &
  pid=$!
  wait "$pid" || rc=$?
  pid=""
  if [ "$rc" -ne 0 ]; then
    report "$log" >&2
    echo "fuzz: $name FAILED (exit $rc) after at most $secs s; full log: $log" >&2
    sed -n 's/.*Test unit written to \(.*\)/fuzz: input kept in \1/p' "$log" >&2
    echo "fuzz: replay with $dir/tests/$name <input>" >&2
    return 1
  fi
  local done_line runs rate peak
  # "#7864127<TAB>DONE   cov: 38 ft: 84 corp: 33/1794b lim: ..." -> "cov: 38 ft: 84 corp: 33/1794b"
  done_line=$(grep -a 'DONE ' "$log" | tail -n 1 | sed -n 's/.*DONE *\(cov: .* corp: [^ ]*\).*/\1/p')
  runs=$(sed -n 's/^stat::number_of_executed_units:[[:space:]]*//p' "$log")
  rate=$(sed -n 's/^stat::average_exec_per_sec:[[:space:]]*//p' "$log")
  peak=$(sed -n 's/^stat::peak_rss_mb:[[:space:]]*//p' "$log")
  echo "fuzz: $name ok: ${runs:-?} runs in $secs s (${rate:-?}/s), ${done_line:-no stats}," \
       "peak rss ${peak:-?} MB"
}

status=0
run fuzz_sip "$sip_s" 8192 || status=1
run fuzz_msg "$msg_s" 4096 || status=1
exit $status
