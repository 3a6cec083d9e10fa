# Shared shell helpers for scripts/run-local and scripts/test.
# Everything project-local lives under .local/ (git-ignored).

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
LOCAL="$ROOT/.local"
PG_PORT=${CLAWDEPLOY_PG_PORT:-54329}
PG_DIR="$LOCAL/pg"
STANDIN_IMAGE=${CLAWDEPLOY_IMAGE:-clawdeploy/openclaw-standin:dev}

log() { printf '\033[1;34m==>\033[0m %s\n' "$*" >&2; }

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

pg_bin() {
  local d
  for d in /usr/lib/postgresql/*/bin; do [ -x "$d/initdb" ] && { echo "$d"; return; }; done
  return 1
}

# Installs what the build and the local cluster need, only when missing.
ensure_tools() {
  local missing=()
  command -v protoc >/dev/null || missing+=(protobuf-compiler)
  pg_bin >/dev/null || missing+=(postgresql)
  command -v psql >/dev/null || missing+=(postgresql-client)
  command -v curl >/dev/null || missing+=(curl)
  command -v openssl >/dev/null || missing+=(openssl)
  # Let's Encrypt's test CA and its DNS server with a management API
  # (custom domains' ownership checks and certificates).
  command -v pebble-challtestsrv >/dev/null || missing+=(pebble)
  # The agent installs tenant firewall rules; tests probe from a busybox image.
  command -v iptables >/dev/null || missing+=(iptables)
  command -v flock >/dev/null || missing+=(util-linux)
  # The clock-skew test runs an agent with its wall clock moved.
  command -v faketime >/dev/null || missing+=(faketime)
  # Provisioning: Ansible with its collections (Debian's), and mmdebstrap
  # for the test's Debian hosts. The linter is the current one, from PyPI
  # (`lint_ansible`).
  command -v ansible-playbook >/dev/null || missing+=(ansible)
  command -v mmdebstrap >/dev/null || missing+=(mmdebstrap)
  [ -x /bin/busybox ] || missing+=(busybox-static)
  # An end-to-end test checks every /metrics endpoint with promtool.
  command -v promtool >/dev/null || missing+=(prometheus)
  # The signup page's browser test drives headless Chromium.
  command -v chromedriver >/dev/null || missing+=(chromium chromium-driver)
  if [ ${#missing[@]} -gt 0 ]; then
    log "installing ${missing[*]}"
    as_root apt-get update -qq
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
  # The prometheus package may start its own server; the tests need only promtool.
  if [[ " ${missing[*]} " == *" prometheus "* ]]; then as_root systemctl disable --now prometheus >/dev/null 2>&1 || true; fi
  command -v docker >/dev/null || { echo "docker is required (the engine must be running)" >&2; exit 1; }
  docker info >/dev/null 2>&1 || { echo "the Docker engine is not reachable" >&2; exit 1; }
}

# The project's Python tools live in one venv under .local (moto's S3
# server, ansible-lint), each pinned.
VENV="$LOCAL/venv"
ANSIBLE_LINT_PIN="ansible-lint==26.10.1 ansible-core==2.19.14"

ensure_venv() { [ -x "$VENV/bin/pip" ] || python3 -m venv "$VENV"; }

# Whether the venv has each `package==version` given.
venv_has() {
  "$VENV/bin/python" - "$@" <<'PY' 2>/dev/null
import sys
from importlib.metadata import version
sys.exit(0 if all(version(p.split("==")[0]) == p.split("==")[1] for p in sys.argv[1:]) else 1)
PY
}

# A real SMTP server for local runs and tests: aiosmtpd (PyPI, pinned),
# delivering every message into a Maildir.
AIOSMTPD_PIN="aiosmtpd==1.4.6"
ensure_smtp_tools() {
  ensure_venv
  # shellcheck disable=SC2086
  if ! venv_has $AIOSMTPD_PIN; then
    log "installing $AIOSMTPD_PIN (PyPI) into $VENV"
    "$VENV/bin/pip" install -q $AIOSMTPD_PIN
  fi
}

# Starts aiosmtpd on 127.0.0.1:$1 writing to the Maildir $2 (its log
# beside it); prints its pid once it accepts connections.
start_smtp() {
  local port=$1 maildir=$2
  ensure_smtp_tools
  mkdir -p "$(dirname "$maildir")"
  "$VENV/bin/aiosmtpd" -n -l "127.0.0.1:$port" -c aiosmtpd.handlers.Mailbox "$maildir" \
    >"$(dirname "$maildir")/smtp.log" 2>&1 &
  local pid=$! i
  for i in $(seq 1 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
    sleep 0.1
  done
  echo "$pid"
}

# Lints the Ansible roles with the pinned ansible-lint (production
# profile), installing it when missing. The collections the roles use
# (community.postgresql, ansible.posix) are Debian's, which the
# provisioning test runs with too.
lint_ansible() {
  ensure_venv
  # shellcheck disable=SC2086
  if ! venv_has $ANSIBLE_LINT_PIN; then
    log "installing $ANSIBLE_LINT_PIN (PyPI) into $VENV"
    # shellcheck disable=SC2086
    "$VENV/bin/pip" install -q $ANSIBLE_LINT_PIN
  fi
  local collections
  collections=$(/usr/bin/python3 -c 'import ansible_collections, os; print(os.path.dirname(list(ansible_collections.__path__)[0]))')
  (cd "$ROOT/ansible" && PATH="$VENV/bin:$PATH" ANSIBLE_COLLECTIONS_PATH="$collections" \
    ansible-lint --profile production -q --nocolor)
}

# A throwaway CA and a wildcard certificate for *.$2 in $1 (ca.crt.pem,
# edge.crt.pem, edge.key.pem), for local runs of the edge's HTTPS listener.
issue_local_wildcard() {
  local dir=$1 domain=$2
  mkdir -p "$dir"
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 30 \
    -keyout "$dir/ca.key.pem" -out "$dir/ca.crt.pem" -subj "/CN=ClawDeploy local CA" \
    -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign 2>/dev/null
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
    -keyout "$dir/edge.key.pem" -out "$dir/edge.csr" -subj "/CN=*.$domain" 2>/dev/null
  printf 'subjectAltName=DNS:*.%s,DNS:%s\nextendedKeyUsage=serverAuth\nbasicConstraints=CA:FALSE\n' "$domain" "$domain" >"$dir/edge.ext"
  openssl x509 -req -in "$dir/edge.csr" -CA "$dir/ca.crt.pem" -CAkey "$dir/ca.key.pem" -CAcreateserial \
    -days 30 -out "$dir/edge.crt.pem" -extfile "$dir/edge.ext" 2>/dev/null
  chmod 600 "$dir/ca.key.pem" "$dir/edge.key.pem"
}

# The proxies the edge benchmark compares against, and its load tools, all
# from Debian's packages.
ensure_bench_peers() {
  local missing=()
  command -v nginx >/dev/null || missing+=(nginx-light)
  command -v caddy >/dev/null || missing+=(caddy)
  command -v wrk >/dev/null || missing+=(wrk)
  command -v h2load >/dev/null || missing+=(nghttp2-client)
  if [ ${#missing[@]} -gt 0 ]; then
    log "installing ${missing[*]}"
    as_root apt-get update -qq
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
  # The packages start their own services; the benchmark runs its own.
  as_root systemctl disable --now nginx caddy >/dev/null 2>&1 || true
}

# PostgreSQL runs from the system's binaries as the unprivileged `postgres`
# user, in a cluster under .local/pg, on 127.0.0.1:$PG_PORT. Tuned for
# development and tests (no fsync): not a production configuration.
# pg_stat_statements is loaded so the benchmarks can say which statements
# cost what.
ensure_postgres() {
  local bin; bin=$(pg_bin)
  local run_as=()
  if [ "$(id -u)" = 0 ]; then run_as=(runuser -u postgres --); fi
  mkdir -p "$PG_DIR"
  if [ "$(id -u)" = 0 ]; then chown postgres: "$PG_DIR"; fi
  if [ ! -f "$PG_DIR/data/PG_VERSION" ]; then
    log "initdb $PG_DIR/data"
    "${run_as[@]}" "$bin/initdb" -D "$PG_DIR/data" -U postgres --auth=trust -E UTF8 >/dev/null
  fi
  if "${run_as[@]}" "$bin/pg_ctl" -D "$PG_DIR/data" status >/dev/null 2>&1; then
    # Already running: use the port it listens on (postmaster.pid, line 4).
    PG_PORT=$(sed -n 4p "$PG_DIR/data/postmaster.pid")
  else
    # Another server (another checkout's cluster, say) may hold the port.
    while (exec 3<>"/dev/tcp/127.0.0.1/$PG_PORT") 2>/dev/null; do
      log "port $PG_PORT is taken; trying $((PG_PORT + 1))"
      PG_PORT=$((PG_PORT + 1))
    done
    mkdir -p "$PG_DIR/run"; [ "$(id -u)" = 0 ] && chown postgres: "$PG_DIR/run"
    log "starting PostgreSQL on 127.0.0.1:$PG_PORT"
    "${run_as[@]}" "$bin/pg_ctl" -D "$PG_DIR/data" -l "$PG_DIR/postgres.log" -w start \
      -o "-c listen_addresses=127.0.0.1 -p $PG_PORT -k $PG_DIR/run -c max_connections=600 -c shared_buffers=256MB -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c shared_preload_libraries=pg_stat_statements" >/dev/null \
      || { tail -20 "$PG_DIR/postgres.log" >&2; exit 1; }
  fi
  export PGHOST=127.0.0.1 PGPORT=$PG_PORT PGUSER=postgres
}

# Builds the OpenClaw stand-in statically and wraps it in a FROM scratch image.
build_standin_image() {
  log "building the OpenClaw stand-in image $STANDIN_IMAGE"
  (cd "$ROOT" && RUSTFLAGS='-C target-feature=+crt-static' cargo build -q --release -p openclaw-standin --target x86_64-unknown-linux-gnu)
  local ctx="$LOCAL/standin-image"
  rm -rf "$ctx"; mkdir -p "$ctx/rootfs/home/node/.openclaw"
  cp "$ROOT/target/x86_64-unknown-linux-gnu/release/openclaw-standin" "$ctx/"
  cp "$ROOT/tests/standin/Dockerfile" "$ctx/"
  docker build -q -t "$STANDIN_IMAGE" "$ctx" >/dev/null
}

# Removes every container, volume and network an agent with this node id
# made. Best effort: what Docker refuses to remove (a network with a stale
# endpoint, say) is reported and left, never fatal.
docker_cleanup_node() {
  local node=$1 ids vols nets
  ids=$(docker ps -aq --filter "label=clawdeploy.node=$node")
  if [ -n "$ids" ]; then docker rm -f $ids >/dev/null 2>&1 || log "could not remove containers of $node"; fi
  vols=$(docker volume ls -q --filter "label=clawdeploy.node=$node")
  if [ -n "$vols" ]; then docker volume rm -f $vols >/dev/null 2>&1 || log "could not remove volumes of $node"; fi
  nets=$(docker network ls -q --filter "label=clawdeploy.node=$node")
  if [ -n "$nets" ]; then docker network rm $nets >/dev/null 2>&1 || log "could not remove the network of $node"; fi
  return 0
}

# The S3-compatible object store for state archives: moto's server (PyPI
# `moto[server]`, in the project's venv under .local/venv), bound to
# 127.0.0.1:$S3_PORT, with the bucket $S3_BUCKET. A development and test
# stand-in only: it keeps objects in memory and does not check signatures.
# Exports CLAWDEPLOY_ARCHIVE_* for the scheduler and the tests.
S3_PORT=${CLAWDEPLOY_S3_PORT:-54390}
S3_BUCKET=clawdeploy-archives
ensure_object_store() {
  local venv="$VENV" dir="$LOCAL/s3"
  if [ ! -x "$venv/bin/moto_server" ]; then
    ensure_venv
    log "installing moto[server] (PyPI) into $venv"
    "$venv/bin/pip" install -q "moto[server]"
  fi
  mkdir -p "$dir"
  if ! { [ -f "$dir/pid" ] && kill -0 "$(cat "$dir/pid")" 2>/dev/null; }; then
    while (exec 3<>"/dev/tcp/127.0.0.1/$S3_PORT") 2>/dev/null; do
      log "port $S3_PORT is taken; trying $((S3_PORT + 1))"
      S3_PORT=$((S3_PORT + 1))
    done
    log "starting the S3-compatible store (moto) on 127.0.0.1:$S3_PORT"
    nohup "$venv/bin/moto_server" -H 127.0.0.1 -p "$S3_PORT" >"$dir/moto.log" 2>&1 &
    echo $! >"$dir/pid"
    echo "$S3_PORT" >"$dir/port"
    local i
    for i in $(seq 1 100); do
      (exec 3<>"/dev/tcp/127.0.0.1/$S3_PORT") 2>/dev/null && break
      sleep 0.1
    done
  else
    S3_PORT=$(cat "$dir/port")
  fi
  curl -sf -X PUT "http://127.0.0.1:$S3_PORT/$S3_BUCKET" -o /dev/null \
    || curl -sf "http://127.0.0.1:$S3_PORT/$S3_BUCKET" -o /dev/null \
    || { tail -20 "$dir/moto.log" >&2; echo "the object store did not start" >&2; exit 1; }
  export CLAWDEPLOY_ARCHIVE_ENDPOINT="http://127.0.0.1:$S3_PORT"
  export CLAWDEPLOY_ARCHIVE_BUCKET="$S3_BUCKET"
  export CLAWDEPLOY_ARCHIVE_REGION=us-east-1
  export CLAWDEPLOY_ARCHIVE_ACCESS_KEY_ID=local
  export CLAWDEPLOY_ARCHIVE_SECRET_ACCESS_KEY=local-secret
}

# A Debian bookworm image that boots systemd, with python3 and sshd: the
# Hetzner-like hosts the Ansible test provisions. Built from Debian's
# mirror with mmdebstrap and `docker import`ed (no registry needed).
HOST_IMAGE=clawdeploy/debian-host:bookworm
build_host_image() {
  docker image inspect "$HOST_IMAGE" >/dev/null 2>&1 && return 0
  command -v mmdebstrap >/dev/null || ensure_tools
  log "building $HOST_IMAGE with mmdebstrap (a few minutes, once)"
  local tar="$LOCAL/debian-host.tar"
  mkdir -p "$LOCAL"
  # apt lists kept, and dated in the past, so Ansible's first `apt update`
  # with cache_valid_time really updates.
  # The packages the roles install are downloaded into apt's cache (not
  # installed), as an apt proxy next to the hosts would hold them: the
  # test measures the roles, not the mirror.
  local debs="unattended-upgrades nftables netbase systemd-timesyncd sudo acl docker.io apparmor prometheus postgresql python3-psycopg2"
  as_root mmdebstrap --variant=apt --quiet --skip=cleanup/apt/lists --skip=cleanup/apt/cache \
    --include=systemd,systemd-sysv,dbus,python3,python3-apt,openssh-server,sudo,ca-certificates,iproute2,procps,curl,gnupg \
    --customize-hook='chroot "$1" systemctl enable ssh' \
    --customize-hook="chroot \"\$1\" apt-get install -y -q --no-install-recommends --download-only $debs >/dev/null" \
    --customize-hook='touch -d "2020-01-01" "$1"/var/lib/apt/lists "$1"/var/lib/apt/lists/* || true' \
    --customize-hook='rm -f "$1"/etc/ssh/ssh_host_*' \
    --customize-hook='chroot "$1" sh -c "echo \"[Unit]\nDescription=SSH host keys\nBefore=ssh.service\n[Service]\nType=oneshot\nExecStart=/usr/bin/ssh-keygen -A\n[Install]\nWantedBy=multi-user.target\" > /etc/systemd/system/ssh-keygen.service && systemctl enable ssh-keygen"' \
    bookworm "$tar" http://deb.debian.org/debian
  # (`docker run --stop-signal SIGRTMIN+3` stops systemd cleanly.)
  docker import --change 'CMD ["/sbin/init"]' "$tar" "$HOST_IMAGE" >/dev/null
  rm -f "$tar"
}
