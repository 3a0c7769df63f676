#!/usr/bin/env bash
# Installs the peers the bench binaries compare dlm against, from Debian's
# packages: etcd (etcd-server, v3 API) and Redis (redis-server).
#
# The benches start their own etcd / redis-server processes on loopback with
# temporary data directories; nothing here needs to keep running. Where the
# packages' install scripts start a system service, it is stopped again so it
# does not take load (or a port) during a run.
#
#   bash benches/install-peers.sh        # then: cargo bench --bench lock
set -euo pipefail

if [ "$(id -u)" -ne 0 ]; then
  echo "install-peers: run as root (apt-get install)" >&2
  exit 1
fi

export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-cache policy etcd-server redis-server | sed -n '1,20p'

# Keep package scripts from starting daemons (containers have no init anyway).
policy=/usr/sbin/policy-rc.d
created_policy=0
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\nexit 101\n' >"$policy"
  chmod +x "$policy"
  created_policy=1
fi
trap '[ "$created_policy" = 1 ] && rm -f "$policy"' EXIT

apt-get install -y -qq --no-install-recommends etcd-server redis-server >/dev/null

for bin in etcd redis-server; do
  if command -v "$bin" >/dev/null; then
    echo "install-peers: $bin -> $(command -v "$bin") ($("$bin" --version 2>&1 | head -1))"
  else
    echo "install-peers: $bin missing after install" >&2
    exit 1
  fi
done
