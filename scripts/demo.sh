#!/usr/bin/env bash
# A local p2psip overlay on 127.0.0.1, narrated. Installs missing Debian
# packages, builds, starts the daemons in a temporary state directory, shows
# what they do, and stops every process it started when it ends or when
# interrupted (Ctrl-C).
#   scripts/demo.sh           run the demonstration
#   scripts/demo.sh --keep    keep the state directory (configs, certificates, logs)
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)

keep=0
case "${1:-}" in
  "") ;;
  --keep) keep=1 ;;
  -h|--help) sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
  *) echo "demo.sh: unknown option '$1' (try --help)" >&2; exit 2 ;;
esac

say()  { printf '\n\033[1m==> %s\033[0m\n' "$*"; }
note() { printf '    %s\n' "$*"; }

pids=()
state=""
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  if [ ${#pids[@]} -gt 0 ]; then
    for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    for p in "${pids[@]}"; do
      for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
      kill -KILL "$p" 2>/dev/null || true
    done
  fi
  if [ -n "$state" ] && [ -d "$state" ]; then
    if [ $keep -eq 1 ]; then echo "state kept in $state"; else rm -rf "$state"; fi
  fi
  exit $rc
}
trap cleanup EXIT
trap 'echo; echo "interrupted: stopping everything"; exit 130' INT TERM

say "1. Dependencies and build"
if [ -n "${P2P_BUILD_DIR:-}" ]; then
  build=$P2P_BUILD_DIR # the test suite runs the demo against the build it is testing
else
  "$top/scripts/deps.sh"
  build=$("$top/scripts/build.sh" normal)
fi
for d in loginserver bootstrap supernode ordinarynode; do
  note "$("$build/$d/$d" --version)"
done

state=$(mktemp -d /tmp/p2psip-demo-XXXXXX)
overlay=demo.p2psip
note "state directory: $state"

say "2. The login server: a new overlay CA, accounts, and the signed configuration document"
cat > "$state/loginserver.json" <<JSON
{ "overlay": "$overlay", "listen": "127.0.0.1:8440", "state_dir": "$state/loginserver",
  "bootstrap_urls": ["https://127.0.0.1:8443"],
  "promotion_min_uptime_s": 3, "promotion_min_cpus": 1, "promotion_min_free_mem_mb": 64,
  "promotion_min_bandwidth_kbps": 1000, "promotion_sn_target_load": 1 }
JSON
ls_cmd() { "$build/loginserver/loginserver" -c "$state/loginserver.json" "$@"; }
init_out=$(ls_cmd init)
pin=$(printf '%s\n' "$init_out" | sed -n 's/^CA pin: //p')
note "loginserver init: CA pin $pin"
for u in sn1 sn2 sn3 alice bob carol; do
  # alice and bob may never host a super node; carol's node may be promoted.
  case $u in alice|bob) extra=--no-supernode ;; *) extra= ;; esac
  echo "$u-demo-password" | ls_cmd user add "$u" $extra >/dev/null
done
note "the overlay document's promotion thresholds (low, for the demo): up 3 s, 1 core, 64 MiB free, 1 Mbit/s, more than 1 ordinary node per super node"
note "accounts: $(ls_cmd user list | awk '{print $1}' | tr '\n' ' ')"
"$build/loginserver/loginserver" -d -c "$state/loginserver.json" > "$state/loginserver.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do grep -q "started" "$state/loginserver.log" && break; sleep 0.05; done
note "loginserver (pid ${pids[-1]}): $(grep -m1 'serving on' "$state/loginserver.log" | sed 's/^.*info  //')"

say "3. Every node enrolls: document checked against the pin, key made locally, certificate issued"
for sn in sn1 sn2 sn3; do
  case $sn in sn1) listen=127.0.0.1:7001 ;; sn2) listen=127.0.0.1:7002 ;; sn3) listen='[::1]:7003' ;; esac
  case $sn in sn1) ring='"seed": true' ;; *) ring='"join": ["127.0.0.1:7001"]' ;; esac
  cat > "$state/$sn.json" <<JSON
{ "overlay": "$overlay", "listen": "$listen", "state_dir": "$state/$sn", $ring }
JSON
done
for on in alice bob; do
  sip=$([ $on = alice ] && echo 5061 || echo 5062)
  cat > "$state/$on.json" <<JSON
{ "overlay": "$overlay", "state_dir": "$state/$on", "sip_listen": "127.0.0.1:$sip",
  "supernodes": ["127.0.0.1:7001", "127.0.0.1:7002"] }
JSON
done
cat > "$state/carol.json" <<JSON
{ "overlay": "$overlay", "state_dir": "$state/carol", "sip_listen": "127.0.0.1:5063",
  "listen": "127.0.0.1:7011", "supernodes": ["127.0.0.1:7002"], "bootstrap_urls": [] }
JSON
for n in sn1 sn2 sn3 alice bob carol; do
  case $n in sn*) bin=supernode ;; *) bin=ordinarynode ;; esac
  echo "$n-demo-password" | "$build/$bin/$bin" -c "$state/$n.json" enroll \
    --login https://127.0.0.1:8440 --pin "$pin" --user "$n" | head -1 | sed "s/^/    $n: /"
done
note "alice's state directory: $(ls "$state/alice" | tr '\n' ' ')($(stat -c %a "$state/alice/key.pem") on the key)"
note "a wrong password:"
echo "not-her-password" | "$build/ordinarynode/ordinarynode" -c "$state/alice.json" enroll \
  --login https://127.0.0.1:8440 --pin "$pin" --user alice 2>&1 | sed 's/^/      /' || true
note "a wrong pin (someone else's login server):"
echo "alice-demo-password" | "$build/ordinarynode/ordinarynode" -o "state_dir=$state/nobody" enroll \
  --login https://127.0.0.1:8440 --pin "sha256:$(printf '0%.0s' $(seq 64))" --user alice 2>&1 | sed 's/^/      /' || true
note "renewal (new key, same Node-ID):"
"$build/ordinarynode/ordinarynode" -c "$state/alice.json" renew | head -1 | sed 's/^/      /'

# A second, unrelated CA: its certificates must be refused by the overlay.
printf 'cn = "rogue CA"\nca\ncert_signing_key\nexpiration_days = 2\n' > "$state/rogue-ca.tmpl"
certtool --generate-privkey --key-type ed25519 --outfile "$state/rogue-ca.key" 2>/dev/null
certtool --generate-self-signed --load-privkey "$state/rogue-ca.key" \
  --template "$state/rogue-ca.tmpl" --outfile "$state/rogue-ca.pem" >/dev/null 2>&1
oid=1.3.6.1.4.1.32473.2026
printf 'cn = "mallory"\nuri = "sip:mallory@%s"\ntls_www_server\ntls_www_client\nsigning_key\nexpiration_days = 2\nadd_extension = "%s.1 0x0414%s"\nadd_extension = "%s.2 0x040103"\n' \
  "$overlay" "$oid" "$(head -c 20 /dev/urandom | od -An -tx1 | tr -d ' \n')" "$oid" > "$state/mallory.tmpl"
certtool --generate-privkey --key-type ed25519 --outfile "$state/mallory.key" 2>/dev/null
certtool --generate-certificate --load-privkey "$state/mallory.key" --load-ca-privkey "$state/rogue-ca.key" \
  --load-ca-certificate "$state/rogue-ca.pem" --template "$state/mallory.tmpl" --outfile "$state/mallory.pem" >/dev/null 2>&1
cat > "$state/mallory.json" <<JSON
{ "overlay": "$overlay", "listen": "127.0.0.1:7099", "state_dir": "$state/mallory",
  "ca_file": "$state/loginserver/ca.pem", "cert_file": "$state/mallory.pem", "key_file": "$state/mallory.key" }
JSON
ls_cmd issue --service 127.0.0.1 --out "$state/bootstrap" >/dev/null
note "service certificate for the bootstrap server: $(ls "$state/bootstrap" | tr '\n' ' ')"
cat > "$state/bootstrap.json" <<JSON
{ "overlay": "$overlay", "listen": "127.0.0.1:8443", "state_dir": "$state/bootstrap",
  "ca_file": "$state/loginserver/ca.pem", "cert_file": "$state/bootstrap/127.0.0.1.pem",
  "key_file": "$state/bootstrap/127.0.0.1.key" }
JSON
note "a typo in a configuration is caught before anything starts:"
echo '{ "overlay": "x", "lsiten": "127.0.0.1:7000" }' > "$state/typo.json"
note "  $("$build/supernode/supernode" -n -c "$state/typo.json" 2>&1 || true)"

say "4. Starting the other daemons (foreground, logs in the state directory)"
declare -A pid_of
start() { # name binary
  local name=$1 bin=$2
  "$build/$bin/$bin" -d -c "$state/$name.json" > "$state/$name.log" 2>&1 &
  pids+=($!)
  pid_of[$name]=$!
  for _ in $(seq 100); do
    grep -q "started" "$state/$name.log" && break
    kill -0 "${pids[-1]}" 2>/dev/null || { cat "$state/$name.log"; echo "$name failed to start"; exit 1; }
    sleep 0.05
  done
  note "$name (pid ${pids[-1]}): $(grep -m1 -E 'listening|state in|serving on|SIP' "$state/$name.log" | sed 's/^.*info  //')"
}
start bootstrap bootstrap
start sn1 supernode
start sn2 supernode
start sn3 supernode

say "5. Mutual TLS 1.3 between super nodes, identities from the certificates"
"$build/supernode/supernode" -c "$state/sn2.json" ping 127.0.0.1:7001 | sed 's/^/    sn2 -> sn1: /'
"$build/supernode/supernode" -c "$state/sn2.json" ping '[::1]:7003' | sed 's/^/    sn2 -> sn3 (IPv6): /'
"$build/supernode/supernode" -c "$state/sn1.json" ping 127.0.0.1:7009 2>&1 | sed 's/^/    sn1 -> 127.0.0.1:7009 (nothing listens there): /' || true
sleep 0.2
note "what sn1 logged about its peer:"
grep -m1 "connection open to sip:sn2" "$state/sn1.log" | sed 's/^.*info  /      /'

say "6. A node whose certificate comes from another CA is refused, with a reason on both sides"
"$build/supernode/supernode" -c "$state/mallory.json" ping 127.0.0.1:7001 2>&1 | sed 's/^/    mallory: /' || true
sleep 0.2
grep -m1 "peer certificate refused" "$state/sn1.log" | sed 's/^.*  tls: /    sn1: /;s/^.*warn  /    sn1: /'

say "7. The ring: three super nodes, records signed by their owners"
for _ in $(seq 100); do
  "$build/supernode/supernode" -c "$state/sn1.json" status 2>/dev/null | grep -q "successor 2" && break
  sleep 0.1
done
"$build/supernode/supernode" -c "$state/sn1.json" status | sed 's/^/    sn1: /'
dhtctl="$build/supernode/dhtctl"
note "alice stores a note through sn1; bob reads it through sn3 and checks alice's signature:"
"$dhtctl" --state "$state/alice" --sn 127.0.0.1:7001 put --type note --name greeting \
  --value '{"text":"hello from alice"}' | sed 's/^/      /'
"$dhtctl" --state "$state/bob" --sn '[::1]:7003' get --type note --name greeting | sed 's/^/      /'
note "bob may not overwrite alice's note (the store refuses a non-owner):"
"$dhtctl" --state "$state/bob" --sn 127.0.0.1:7002 put --type note --name greeting \
  --value '{"text":"bob was here"}' 2>&1 | sed 's/^/      /' || true

say "8. Ordinary nodes: attached, registered, and finding each other"
on="$build/ordinarynode/ordinarynode"
start alice ordinarynode
start bob ordinarynode
for n in alice bob; do
  for _ in $(seq 200); do grep -q "published user location" "$state/$n.log" && break; sleep 0.05; done
  note "$n: $(grep -m1 'attached to super node' "$state/$n.log" | sed 's/^.*info  on: //')"
  note "$n: $(grep -m1 'published user location' "$state/$n.log" | sed 's/^.*info  on: //')"
done
note "alice's node, as 'ordinarynode status' shows it:"
"$on" -c "$state/alice.json" status | sed 's/^/      /'
note "bob looks alice up; his node checks her signature and certificate:"
"$on" -c "$state/bob.json" get "user location" "alice@$overlay" | sed 's/^/      /'
sn_addr=$("$on" -c "$state/alice.json" status --json | sed -n 's/.*"supernode":{[^}]*"addr":"\([^"]*\)".*/\1/p')
case $sn_addr in 127.0.0.1:7001) victim=sn1 ;; 127.0.0.1:7002) victim=sn2 ;; *) victim=sn3 ;; esac
note "alice's super node is $victim ($sn_addr); killing it with SIGKILL:"
kill -KILL "${pid_of[$victim]}"
wait "${pid_of[$victim]}" 2>/dev/null || true
left=()
for p in "${pids[@]}"; do [ "$p" != "${pid_of[$victim]}" ] && left+=("$p"); done
pids=("${left[@]}")
for _ in $(seq 100); do
  [ "$(grep -c 'attached to super node' "$state/alice.log")" -ge 2 ] && break; sleep 0.05
done
grep 'lost\|attached to super node' "$state/alice.log" | tail -2 | sed 's/^.*  on: /      alice: /'
for _ in $(seq 100); do [ "$(grep -c 'published user location' "$state/alice.log")" -ge 2 ] && break; sleep 0.05; done
note "bob looks alice up again: her record now names her new super node:"
"$on" -c "$state/bob.json" get "user location" "alice@$overlay" --json |
  sed -n 's/.*"sn":{"id":"\([0-9a-f]\{8\}\)[0-9a-f]*","addr":"\([^"]*\)".*/      re-attached: super node \1... at \2/p'

say "9. Promotion: carol's node qualifies and becomes a super node in its own process"
note "carol runs an ordinary node with an overlay port (127.0.0.1:7011); the super nodes probe it by connecting back"
start carol ordinarynode
for _ in $(seq 300); do grep -q "promoted: now a super node" "$state/carol.log" && break; sleep 0.05; done
grep -E "invites us|reachable at|promoting: every|promoted:" "$state/carol.log" | head -4 |
  sed 's/^.*info  [a-z]*: /      carol: /'
for _ in $(seq 100); do  # first to sn2, then to its own role
  [ "$(grep -c 'attached to super node' "$state/carol.log")" -ge 2 ] && break; sleep 0.05
done
note "carol's node, as 'ordinarynode status' shows it (its user now goes through its own super node role):"
"$on" -c "$state/carol.json" status | grep -E "^(node|super node|promotion|as super)" | sed 's/^/      /'
sn_ring=$([ "$victim" = sn2 ] && echo sn3 || echo sn2)
for _ in $(seq 100); do
  "$build/supernode/supernode" -c "$state/$sn_ring.json" status 2>/dev/null | grep -q "^successor .* at 127.0.0.1:7011" && break
  sleep 0.1
done
note "the ring as $sn_ring sees it now:"
"$build/supernode/supernode" -c "$state/$sn_ring.json" status | grep -E "predecessor|successor" | sed 's/^/      /'
for _ in $(seq 100); do
  curl -s --cacert "$state/loginserver/ca.pem" "https://127.0.0.1:8443/v1/supernodes" | grep -q 7011 && break
  sleep 0.1
done
note "the bootstrap server lists it (a killed super node's entry stays until it expires):"
curl -s --cacert "$state/loginserver/ca.pem" "https://127.0.0.1:8443/v1/supernodes" |
  grep -o '"address":"[^"]*"' | sed 's/^/      /'
note "bob looks carol up; the answer comes from the ring carol is now part of:"
for _ in $(seq 100); do "$on" -c "$state/bob.json" get "user location" "carol@$overlay" >/dev/null 2>&1 && break; sleep 0.05; done
"$on" -c "$state/bob.json" get "user location" "carol@$overlay" | sed 's/^/      /'

say "10. A SIP call through the overlay: two sipp phones register at their own nodes, alice calls bob"
sipp_run() { # scenario local-port [sipp arguments...]; its output goes to the state directory
  local sc=$1 port=$2
  shift 2
  sipp -sf "$top/tests/sipp/$sc.xml" -m 1 -i 127.0.0.1 -p "$port" -t u1 -timeout 20 \
    -timeout_error -nostdin "$@" > "$state/sipp-$sc-$port.log" 2>&1
}
sipp_run register_200 5071 -key user alice -key domain "$overlay" -key expires 600 127.0.0.1:5061
note "alice's phone (sipp at 127.0.0.1:5071) REGISTERed at alice's node (127.0.0.1:5061): 200 OK"
sipp_run register_200 5072 -key user bob -key domain "$overlay" -key expires 600 127.0.0.1:5062
note "bob's phone (sipp at 127.0.0.1:5072) REGISTERed at bob's node (127.0.0.1:5062): 200 OK"
note "the registration is part of bob's signed location record; alice's node reads it from the overlay:"
"$on" -c "$state/alice.json" get "user location" "bob@$overlay" --json |
  sed -n 's/.*"bindings":\[{"contact":"\([^"]*\)".*/      bob is bound at \1 (signature verified)/p'
sipp_run uas_answer 5072 &
uas=$!
pids+=("$uas")
sleep 0.3
note "alice's phone calls sip:bob@$overlay through her node:"
sipp_run uac_call 5071 -s alice -key callee bob -key domain "$overlay" 127.0.0.1:5061
wait "$uas"
left=()
for p in "${pids[@]}"; do [ "$p" != "$uas" ] && left+=("$p"); done
pids=("${left[@]}")
grep -m1 "INVITE for bob@" "$state/alice.log" | sed 's/^.*info  sip: /      alice'"'"'s node: /'
for side in "caller:uac_call-5071" "callee:uas_answer-5072"; do
  f="$state/sipp-${side#*:}.log"
  note "${side%%:*} (sipp): $(grep -oE 'Successful call +\| +[0-9]+ +\| +[0-9]+' "$f" | awk '{print $NF}') successful call, $(grep -oE 'Failed call +\| +[0-9]+ +\| +[0-9]+' "$f" | awk '{print $NF}') failed"
done
note "the messages: INVITE -> 100 (each node) -> 180 -> 200 -> ACK -> BYE -> 200, via both nodes (Via and Record-Route)"

say "11. Stopping everything with SIGTERM, carol's node first: it removes her record, hands its keys over and leaves the ring"
kill -TERM "${pid_of[carol]}"
wait "${pid_of[carol]}" || { echo "carol's node exited with status $?"; exit 1; }
grep -E "removing|removed|promotion: (stopping|left)" "$state/carol.log" | sed 's/^.*info  [a-z]*: /      carol: /'
left=()
for p in "${pids[@]}"; do [ "$p" != "${pid_of[carol]}" ] && left+=("$p"); done
pids=("${left[@]}")
for p in "${pids[@]}"; do kill -TERM "$p"; done
for p in "${pids[@]}"; do wait "$p" || { echo "a daemon exited with status $?"; exit 1; }; done
for f in loginserver bootstrap sn1 sn2 sn3 alice bob carol; do
  [ "$f" = "$victim" ] && continue
  note "$f: $(grep -m1 -E 'info  (daemon|on): .*stopped$' "$state/$f.log" | sed 's/^.*info  //')"
done
pids=()

say "Done. Everything this demo started has exited."
