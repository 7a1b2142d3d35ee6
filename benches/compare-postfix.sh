#!/usr/bin/env bash
# Accept-rate comparison, postrider vs Postfix, on this machine in one run.
#
#   bash benches/compare-postfix.sh [MESSAGES] [SESSIONS] [SIZE] [ROUNDS]   (default 5000 20 2048 3)
#
# ROUNDS interleaved rounds per server, each row printed, then the medians: Postfix's rate
# falls from round to round (its first round on an empty Maildir is its best, later ones settle
# near its steady state), so one round is not a fair comparison in either direction.
#
# Installs Debian's postfix if missing (needs root), configures it for loopback only with local
# delivery to ~bench/Maildir, starts it, then drives Postfix and postrider with the same
# smtp-source command (Postfix's own load generator), plus smtp-sink as the protocol ceiling.
# Every server binds 127.0.0.1 only; every load loop is bounded by MESSAGES.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-5000}
S=${2:-20}
L=${3:-2048}
R=${4:-3}

source benches/lib.sh
install_postfix
id bench >/dev/null 2>&1 || useradd -m bench
# Same start for every run of the script (both servers begin with empty mailboxes).
rm -rf ~bench/Maildir
start_postfix home_mailbox=Maildir/ relayhost=
trap cleanup EXIT
start_postrider <<EOF
[domains]
local = ["localhost"]
EOF
./target/release/postrider user add bench@localhost --password bench --config "$work/postrider.toml" >/dev/null

smtp-sink -u nobody -c 127.0.0.1:2599 1000 >/dev/null 2>&1 &
SINK_PID=$!
sleep 0.3

RCPT=bench@localhost

echo "smtp-source -m $N -s $S -l $L (one connection per message), $(nproc) cores, $(date -u +%F)"
echo "| server                       | accepted       | delivered      |"
echo "|------------------------------|----------------|----------------|"
rate "smtp-sink (no disk, ceiling)" 127.0.0.1:2599
PF=(); PR=()
for r in $(seq "$R"); do
  PF+=("$(rate "Postfix $(postconf -h mail_version), round $r" 127.0.0.1:25 | tee /dev/stderr | awk -F'|' '{print $3+0}')")
  PR+=("$(rate "postrider, round $r" "$PR_ADDR" | tee /dev/stderr | awk -F'|' '{print $3+0}')")
done 2>&1
median() { printf '%s\n' "$@" | sort -n | awk '{v[NR]=$1} END {print v[int((NR+1)/2)]}'; }
mf=$(median "${PF[@]}"); mp=$(median "${PR[@]}")
awk -v f="$mf" -v p="$mp" -v r="$R" 'BEGIN { printf "median of %d rounds: Postfix %d msg/s, postrider %d msg/s, ratio %.1fx\n", r, f, p, p/f }'
ratios=(); for i in "${!PF[@]}"; do ratios+=("$(awk -v f="${PF[$i]}" -v p="${PR[$i]}" 'BEGIN { printf "%.1f", p/f }')"); done
echo "ratio per round: ${ratios[*]} (median $(median "${ratios[@]}")x)"

cargo bench -q --bench load --no-run 2>/dev/null
echo
echo "cargo bench --bench load -- --messages $N --sessions $S --size $L --target ..."
for t in "Postfix:127.0.0.1:25" "postrider:$PR_ADDR" "Postfix (again):127.0.0.1:25" "postrider (again):$PR_ADDR"; do
  label=${t%%:*}; addr=${t#*:}
  printf "%-18s " "$label"
  cargo bench -q --bench load -- --messages "$N" --sessions "$S" --size "$L" --target "$addr" 2>/dev/null | grep accepted
  for _ in $(seq 6000); do drained "$label" && break; sleep 0.05; done
done
