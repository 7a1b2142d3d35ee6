#!/usr/bin/env bash
# End-to-end relay comparison, postrider vs Postfix, on this machine in one run:
#
#   smtp-source -> server -> (relay over SMTP) -> smtp-sink
#
#   bash benches/compare-relay.sh [MESSAGES] [SESSIONS] [SIZE]     (default 5000 20 2048)
#
# Installs Debian's postfix if missing (needs root). Postfix relays with relayhost to the sink,
# postrider with a static route (domains = ["*"]); both keep their default outbound
# concurrency (20 per destination) and connection caching. A run ends when the server's queue
# is empty again, i.e. every message was accepted by the sink. Everything binds 127.0.0.1.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-5000}
S=${2:-20}
L=${3:-2048}
SINK=127.0.0.1:2598

source benches/lib.sh
install_postfix
start_postfix relayhost="[127.0.0.1]:2598" smtp_tls_security_level=none
trap cleanup EXIT
start_postrider <<EOF
[domains]
local = ["localhost"]
[relay]
networks = ["127.0.0.0/8"]
[[route]]
domains = ["*"]
next_hop = "$SINK"
tls = "none"
[dns]
nameservers = ["127.0.0.1:9"]
EOF

smtp-sink -u nobody -c "$SINK" 1000 >/dev/null 2>&1 &
SINK_PID=$!
sleep 0.3

RCPT=rcpt@relay.example

echo "relay: smtp-source -m $N -s $S -l $L -> server -> smtp-sink, $(nproc) cores, $(date -u +%F)"
echo "| server                       | accepted       | relayed (end to end) |"
echo "|------------------------------|----------------|----------------------|"
rate "Postfix $(postconf -h mail_version)" 127.0.0.1:25
rate "postrider" "$PR_ADDR"
rate "Postfix (again)" 127.0.0.1:25
rate "postrider (again)" "$PR_ADDR"

# Proof that postrider's messages reached the sink (not bounced or lost): its own counters.
echo
echo "postrider counters after both rounds (expect $((2 * N)) delivered, no failures, no DSNs):"
curl -s "http://$HTTP_ADDR/metrics" | grep -E '^postrider_(delivery_attempts_total|dsn_sent_total|messages_accepted_total)' || true
