#!/usr/bin/env bash
# Accept-rate comparison, postrider vs Postfix, on this machine in one run.
#
#   bash benches/compare-postfix.sh [MESSAGES] [SESSIONS] [SIZE]     (default 5000 20 2048)
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

if ! command -v smtp-source >/dev/null 2>&1; then
  apt-get update -qq
  echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postfix >/dev/null
fi
id bench >/dev/null 2>&1 || useradd -m bench
[ -f /etc/postfix/main.cf ] || cp /usr/share/postfix/main.cf.debian /etc/postfix/main.cf
postconf -e inet_interfaces=loopback-only inet_protocols=ipv4 myhostname=localhost \
  mydestination=localhost home_mailbox=Maildir/ mynetworks=127.0.0.0/8 \
  smtpd_tls_security_level=none alias_maps= alias_database= compatibility_level=3.6
postfix stop >/dev/null 2>&1 || true
postfix start >/dev/null 2>&1
for _ in $(seq 50); do (exec 3<>/dev/tcp/127.0.0.1/25) 2>/dev/null && break; sleep 0.1; done

cargo build --release -q
work=$(mktemp -d -p "$PWD/target")
trap 'kill $PR_PID $SINK_PID 2>/dev/null || true; postfix stop >/dev/null 2>&1 || true; rm -rf "$work"' EXIT
cat >"$work/postrider.toml" <<EOF
[server]
hostname = "localhost"
data_dir = "$work/data"
[[listener]]
name = "smtp"
kind = "smtp"
bind = "127.0.0.1:0"
[domains]
local = ["localhost"]
[limits]
max_connections_per_ip = 1000
[http]
bind = "127.0.0.1:0"
[log]
level = "warn"
EOF
./target/release/postrider serve --config "$work/postrider.toml" >"$work/out" 2>"$work/err" &
PR_PID=$!
for _ in $(seq 100); do grep -q '^ready' "$work/out" 2>/dev/null && break; sleep 0.1; done
PR_ADDR=$(awk '$1=="listening" && $2=="smtp" {print $3}' "$work/out")
./target/release/postrider user add bench@localhost --password bench --config "$work/postrider.toml" >/dev/null

smtp-sink -u nobody -c 127.0.0.1:2599 1000 >/dev/null 2>&1 &
SINK_PID=$!
sleep 0.3

HTTP_ADDR=$(awk '$1=="listening" && $2=="http" {print $3}' "$work/out")

drained() { # label: 0 when that server's queue is empty
  case "$1" in
    Postfix*) postqueue -p 2>/dev/null | grep -q "Mail queue is empty" ;;
    postrider*) curl -s "http://$HTTP_ADDR/metrics" | grep -q '^postrider_queue_messages 0$' ;;
    *) true ;;
  esac
}

# Accepted = smtp-source's run time (every 250 is durable on both servers). Delivered = until
# that server's queue is empty again (local delivery done), so no run overlaps another's
# delivery backlog.
rate() { # label, target
  local start end done_at
  start=$(date +%s.%N)
  smtp-source -m "$N" -s "$S" -l "$L" -f load@example.org -t bench@localhost "$2" >/dev/null || echo "smtp-source against $2 failed" >&2
  end=$(date +%s.%N)
  for _ in $(seq 6000); do drained "$1" && break; sleep 0.05; done
  done_at=$(date +%s.%N)
  awk -v n="$N" -v a="$start" -v b="$end" -v c="$done_at" -v l="$1" \
    'BEGIN { printf "| %-28s | %8.0f msg/s | %8.0f msg/s |\n", l, n/(b-a), n/(c-a) }'
}

echo "smtp-source -m $N -s $S -l $L (one connection per message), $(nproc) cores, $(date -u +%F)"
echo "| server                       | accepted       | delivered      |"
echo "|------------------------------|----------------|----------------|"
rate "smtp-sink (no disk, ceiling)" 127.0.0.1:2599
rate "Postfix $(postconf -h mail_version)" 127.0.0.1:25
rate "postrider" "$PR_ADDR"
rate "Postfix (again)" 127.0.0.1:25
rate "postrider (again)" "$PR_ADDR"

# The same comparison with postrider's own load generator (persistent sessions, PIPELINING of
# MAIL/RCPT/DATA, end-of-data latency percentiles).
cargo bench -q --bench load --no-run 2>/dev/null
echo
echo "cargo bench --bench load -- --messages $N --sessions $S --size $L --target ..."
for t in "Postfix:127.0.0.1:25" "postrider:$PR_ADDR" "Postfix (again):127.0.0.1:25" "postrider (again):$PR_ADDR"; do
  label=${t%%:*}; addr=${t#*:}
  printf "%-18s " "$label"
  cargo bench -q --bench load -- --messages "$N" --sessions "$S" --size "$L" --target "$addr" 2>/dev/null | grep accepted
  for _ in $(seq 6000); do drained "$label" && break; sleep 0.05; done
done
