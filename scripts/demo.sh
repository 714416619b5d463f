#!/usr/bin/env bash
# Set everything up (scripts/setup.sh), then a demo live migration: a QEMU-like guest (256 MiB
# shared memfd RAM + 64 MiB private RAM, dirtying 50 MB/s, with a vhost-user-like side writer)
# migrated to a receiver on loopback under a 400 MB/s link cap, live progress on the terminal,
# then the destination image checked page by page.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
M=.venv/bin/migrator
work=$(mktemp -d /tmp/migrator-demo.XXXXXX)
cleanup() { kill "${guest_pid:-}" "${recv_pid:-}" 2>/dev/null || true; }
trap cleanup EXIT

echo "== what this kernel supports"
$M probe
echo
echo "== receiver (loopback, images in $work/out)"
$M receive --listen 127.0.0.1:0 --out "$work/out" --once > "$work/receiver.log" 2>&1 &
recv_pid=$!
for _ in $(seq 100); do grep -q "listening on" "$work/receiver.log" 2>/dev/null && break; sleep 0.05; done
port=$(sed -n 's/.*listening on 127\.0\.0\.1:\([0-9]*\).*/\1/p' "$work/receiver.log")
cat "$work/receiver.log"

echo "== guest: 256 MiB shared + 64 MiB anon, random writes at 50 MB/s, vhost-like writer at 10 MB/s"
$M guest --shared-ram 256M --anon-ram 64M --workload random --rate 50MB/s --vhost-rate 10MB/s --uffd \
    > "$work/guest.json" &
guest_pid=$!
for _ in $(seq 100); do [ -s "$work/guest.json" ] && break; sleep 0.05; done
read -r pid anon writers < <(.venv/bin/python -c "
import json; g = json.load(open('$work/guest.json'))
a = [r for r in g['regions'] if r['name'] == 'anon'][0]
print(g['pid'], '%x-%x' % (a['start'], a['end']), ','.join(str(w['pid']) for w in g['writers']) or '-')")
echo "guest pid $pid, anon $anon, side writers $writers"
echo
echo "== migrate (downtime limit 300 ms, link 400 MB/s)"
$M migrate --pid "$pid" --region guest-ram --region "$anon" --writers "${writers/-/}" \
    --to "127.0.0.1:$port" --max-bandwidth 400MB/s --json "$work/report.json" || true
echo
echo "== destination"
wait "$recv_pid" || true
cat "$work/receiver.log" | tail -1
.venv/bin/python - "$work" <<'PY'
import json, sys
m = json.load(open(f"{sys.argv[1]}/out/manifest.json"))
print(f"manifest complete: {m['complete']}")
for r in m["regions"]:
    print(f"  {r['name']:<24} {r['size'] >> 20:>5} MiB  {r['status']}  {r['image']}")
PY
ram=$(.venv/bin/python -c "import json; print([r['image'] for r in json.load(open('$work/out/manifest.json'))['regions'] if r['name']=='guest-ram'][0])")
echo "== every page of the received guest RAM is internally consistent:"
$M verify "$work/out/$ram" --region guest-ram | tail -3
echo "report: $work/report.json"
