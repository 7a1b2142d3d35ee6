# Shared set-up for the Postfix comparison scripts (sourced, not run). Everything binds
# 127.0.0.1; every server started here is stopped by the caller's EXIT trap (see cleanup).

# Installs Debian's postfix (with smtp-source and smtp-sink) if missing; needs root.
install_postfix() {
  if ! command -v smtp-source >/dev/null 2>&1; then
    apt-get update -qq
    echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postfix >/dev/null
  fi
  [ -f /etc/postfix/main.cf ] || cp /usr/share/postfix/main.cf.debian /etc/postfix/main.cf
}

# Configures Postfix for loopback only (plus the caller's postconf settings) and (re)starts it.
start_postfix() {
  postconf -e inet_interfaces=loopback-only inet_protocols=ipv4 myhostname=localhost \
    mydestination=localhost mynetworks=127.0.0.0/8 smtpd_tls_security_level=none \
    alias_maps= alias_database= compatibility_level=3.6 "$@"
  postfix stop >/dev/null 2>&1 || true
  postfix start >/dev/null 2>&1
  for _ in $(seq 50); do (exec 3<>/dev/tcp/127.0.0.1/25) 2>/dev/null && break; sleep 0.1; done
}

# Builds and starts postrider with an SMTP listener and the admin API on free ports, plus the
# caller's config sections (stdin). Sets work, PR_PID, PR_ADDR, HTTP_ADDR.
start_postrider() {
  cargo build --release -q
  work=$(mktemp -d -p "$PWD/target")
  {
    cat <<EOF
[server]
hostname = "localhost"
data_dir = "$work/data"
[[listener]]
name = "smtp"
kind = "smtp"
bind = "127.0.0.1:0"
[limits]
max_connections_per_ip = 1000
[http]
bind = "127.0.0.1:0"
[log]
level = "warn"
EOF
    cat
  } >"$work/postrider.toml"
  ./target/release/postrider serve --config "$work/postrider.toml" >"$work/out" 2>"$work/err" &
  PR_PID=$!
  for _ in $(seq 100); do grep -q '^ready' "$work/out" 2>/dev/null && break; sleep 0.1; done
  PR_ADDR=$(awk '$1=="listening" && $2=="smtp" {print $3}' "$work/out")
  HTTP_ADDR=$(awk '$1=="listening" && $2=="http" {print $3}' "$work/out")
}

cleanup() {
  kill ${PR_PID:-} ${SINK_PID:-} 2>/dev/null || true
  postfix stop >/dev/null 2>&1 || true
  [ -n "${work:-}" ] && rm -rf "$work"
}

# 0 when the labelled server's queue is empty.
drained() {
  case "$1" in
    Postfix*) postqueue -p 2>/dev/null | grep -q "Mail queue is empty" ;;
    postrider*) curl -s "http://$HTTP_ADDR/metrics" | grep -q '^postrider_queue_messages 0$' ;;
    *) true ;;
  esac
}

# One smtp-source run against $2 (label $1) to recipient $RCPT with $N messages, $S sessions,
# $L octets. Accepted = smtp-source's run time (every 250 is durable on both servers);
# done = until that server's queue is empty again, so no run overlaps another's backlog.
rate() { # label, target
  local start end done_at
  start=$(date +%s.%N)
  smtp-source -m "$N" -s "$S" -l "$L" -f load@example.org -t "$RCPT" "$2" >/dev/null ||
    echo "smtp-source against $2 failed" >&2
  end=$(date +%s.%N)
  for _ in $(seq 12000); do drained "$1" && break; sleep 0.02; done
  done_at=$(date +%s.%N)
  awk -v n="$N" -v a="$start" -v b="$end" -v c="$done_at" -v l="$1" \
    'BEGIN { printf "| %-28s | %8.0f msg/s | %8.0f msg/s |\n", l, n/(b-a), n/(c-a) }'
}
