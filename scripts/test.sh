#!/usr/bin/env bash
# The whole test suite: installs missing dependencies, then builds and runs
# every test through ctest twice, in a normal build and in an
# AddressSanitizer+UndefinedBehaviorSanitizer build; with the sanitizer build
# it also runs the libFuzzer targets for about a minute (scripts/fuzz.sh,
# clang, build-fuzz/). Exits non-zero on any failure.
#   scripts/test.sh            both builds, then scripts/fuzz.sh
#   scripts/test.sh --normal   normal build only (faster, for development)
#   scripts/test.sh --asan     sanitizer build only, then scripts/fuzz.sh
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)

flavours=(normal asan)
case "${1:-}" in
  "") ;;
  --normal) flavours=(normal) ;;
  --asan) flavours=(asan) ;;
  -h|--help) sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
  *) echo "test.sh: unknown option '$1' (try --help)" >&2; exit 2 ;;
esac

"$top/scripts/deps.sh"
# Everything the tests need is installed now: a test that finds something missing fails
# rather than skips (tests/integration/harness.py, require()).
export P2P_TEST_STRICT=1

status=0
for f in "${flavours[@]}"; do
  echo "== $f build =="
  dir=$("$top/scripts/build.sh" "$f")
  if [ "$f" = asan ]; then
    export ASAN_OPTIONS=detect_leaks=1:abort_on_error=0:strict_string_checks=1
    export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
  fi
  if ! (cd "$dir" && ctest --output-on-failure --timeout 600 -j 2); then
    status=1
  fi
  if [ "$f" = asan ]; then
    echo "== libFuzzer (scripts/fuzz.sh) =="
    "$top/scripts/fuzz.sh" || status=1
  fi
done
exit $status
