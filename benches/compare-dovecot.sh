#!/usr/bin/env bash
# POP3 comparison, postrider vs Dovecot, on this machine in one run.
#
#   bash benches/compare-dovecot.sh [MESSAGES] [SIZE]        (default 10000 4096)
#
# Installs Debian's dovecot-pop3d if missing (needs root), runs a private Dovecot instance on
# 127.0.0.1:2111 (its own config, run and state directories under target/) over a Maildir of
# MESSAGES messages of SIZE octets, with an ARGON2ID password (postrider also uses argon2id),
# then runs benches/pop3.rs against Dovecot and against a freshly filled postrider.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-10000}
SIZE=${2:-4096}

if ! command -v dovecot >/dev/null 2>&1; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dovecot-pop3d >/dev/null
fi
id bench >/dev/null 2>&1 || useradd -m bench
cargo build --release -q
cargo bench -q --bench pop3 --no-run 2>/dev/null

work=$(mktemp -d -p "$PWD/target")
trap 'kill $(cat "$work/run/master.pid" 2>/dev/null) 2>/dev/null || true; rm -rf "$work"' EXIT
mkdir -p "$work/maildir/cur" "$work/maildir/new" "$work/maildir/tmp" "$work/home" "$work/run" "$work/state"
python3 - "$work/maildir/cur" "$N" "$SIZE" <<'EOF'
import sys
d, n, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
body = b"From: load@example.org\r\nTo: bench@localhost\r\nSubject: pop3 bench\r\n\r\n"
line = b"Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor\r\n"
while len(body) + len(line) <= size:
    body += line
for i in range(n):
    with open("%s/1700000000.M%dP1.bench:2,S" % (d, i), "wb") as f:
        f.write(body)
EOF
chown -R bench:bench "$work/maildir" "$work/home"
chmod 755 "$work"
hash=$(doveadm pw -s ARGON2ID -p bench-password)
echo "bench@localhost:$hash" >"$work/passwd"
cat >"$work/dovecot.conf" <<EOF
protocols = pop3
listen = 127.0.0.1
base_dir = $work/run
state_dir = $work/state
log_path = $work/dovecot.log
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain
pop3_uidl_format = %08Xu%08Xv
passdb {
  driver = passwd-file
  args = $work/passwd
}
userdb {
  driver = static
  args = uid=bench gid=bench home=$work/home mail=maildir:$work/maildir
}
service pop3-login {
  inet_listener pop3 {
    address = 127.0.0.1
    port = 2111
  }
  inet_listener pop3s {
    port = 0
  }
}
service imap-login {
  inet_listener imap {
    port = 0
  }
  inet_listener imaps {
    port = 0
  }
}
EOF
dovecot -c "$work/dovecot.conf"
for _ in $(seq 50); do (exec 3<>/dev/tcp/127.0.0.1/2111) 2>/dev/null && break; sleep 0.1; done

echo "POP3: $N messages of $SIZE octets, $(nproc) cores, $(date -u +%F)"
echo "Dovecot $(dovecot --version | cut -d' ' -f1):"
cargo bench -q --bench pop3 -- --target 127.0.0.1:2111 --user bench@localhost --pass bench-password 2>/dev/null
echo "postrider:"
cargo bench -q --bench pop3 -- --messages "$N" --size "$SIZE" 2>/dev/null
echo "Dovecot (again):"
cargo bench -q --bench pop3 -- --target 127.0.0.1:2111 --user bench@localhost --pass bench-password 2>/dev/null
