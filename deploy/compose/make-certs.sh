#!/usr/bin/env bash
# Creates everything the compose federation needs, under OUT_DIR (default
# deploy/compose/out):
#
#   pki/federation/        the federation root (root.key: the operator's, keep it here)
#   pki/<agency>/          each node directory as `antar pki` lays it out
#                          (certs/README.md), including the local CA key and
#                          the dev app, admin and auditor client certificates
#   <agency>/etc/          what is mounted read-only at /etc/antar in the
#                          node's container: node.toml and certs/ with only
#                          the files the node reads (no CA key, no client key)
#   federation.json        for `antar send/inbox/track/admin --federation`
#                          from the host, through the ports compose.yaml
#                          publishes on 127.0.0.1
#
# Topology (the `antar dev` topology, ARCHITECTURE.md): federation gov.example; finance and health peered
# directly; registry peered only with the hub; finance, health and registry
# send everything else to the hub.
#
# Usage: deploy/compose/make-certs.sh [OUT_DIR]
#   ANTAR_BIN   the antar binary to use (default: antar on PATH)
#   OUT_DIR other than deploy/compose/out: set ANTAR_OUT to the same
#   directory for `docker compose`, whose mounts read ${ANTAR_OUT:-./out}.
#
# Re-running is safe: every certificate, key and config that exists is kept,
# only what is missing is made. Delete OUT_DIR/<agency>/etc to rewrite that
# node's config and certificate bundle.

set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
out=${1:-$here/out}
antar=${ANTAR_BIN:-antar}

federation=gov.example
agencies=(finance health registry hub)

# `antar pki` reads ANTAR_FEDERATION_NAME as the federation name; the client
# commands read ANTAR_FEDERATION (the path of a federation.json) and
# ANTAR_AGENCY. None of them may leak into the commands below.
unset ANTAR_FEDERATION_NAME ANTAR_FEDERATION ANTAR_AGENCY

# Ports inside every container (node.toml). On the host, compose.yaml
# publishes each agency's api, admin and metrics on 127.0.0.1 at its base
# port +0, +2 and +3.
api_port=7443
peer_port=7444
admin_port=7445
metrics_port=7446

# Plain functions rather than associative arrays, so bash 3.2 (macOS) works.
host_base() {
    case $1 in finance) echo 7500 ;; health) echo 7504 ;; registry) echo 7508 ;; hub) echo 7512 ;; esac
}
# Direct peers of each agency.
peers_of() {
    case $1 in
        finance) echo "health hub" ;;
        health) echo "finance hub" ;;
        registry) echo "hub" ;;
        hub) echo "finance health registry" ;;
    esac
}
# Next hop for every agency that is not a direct peer; the hub has none.
default_route_of() {
    case $1 in hub) echo "" ;; *) echo "hub" ;; esac
}

if ! command -v "$antar" >/dev/null 2>&1; then
    echo "error: '$antar' not found; build it (cargo build --release -p antar) and set ANTAR_BIN" >&2
    exit 1
fi

umask 077
mkdir -p "$out"
pki=$out/pki
fed_dir=$pki/federation

if [[ ! -e $fed_dir/root.crt ]]; then
    "$antar" pki init-federation --federation "$federation" --dir "$fed_dir"
fi

for a in "${agencies[@]}"; do
    node=$pki/$a
    # Node TLS and signing certificates from the federation root. Peers check
    # the node's identity (spiffe://gov.example/agency/<a>), not the name; the
    # name is the compose service name the peers dial.
    if [[ ! -e $node/node-signing.crt ]]; then
        "$antar" pki issue-node --federation-dir "$fed_dir" --agency "$a" \
            --node-dir "$node" --dns "$a"
    fi
    # Agency-local CA and API certificate. Clients check the API certificate's
    # name: 127.0.0.1 and localhost for the host (published ports) and for
    # commands run inside the container; <a> for other containers.
    if [[ ! -e $node/api-server.crt ]]; then
        "$antar" pki init-local-ca --node-dir "$node" \
            --dns localhost --dns "$a" --ip 127.0.0.1
    fi
    for role in app admin auditor; do
        if [[ ! -e $node/clients/$role-dev.crt ]]; then
            "$antar" pki issue-client --node-dir "$node" --role "$role" --name dev
        fi
    done

    etc=$out/$a/etc
    if [[ -e $etc/node.toml ]]; then
        echo "kept $etc (delete it to rewrite)"
        continue
    fi
    mkdir -p "$etc/certs"
    chmod 0755 "$etc"
    chmod 0750 "$etc/certs"
    for f in federation-root.crt node-tls.crt node-signing.crt local-ca.crt api-server.crt; do
        install -m 0644 "$node/$f" "$etc/certs/$f"
    done
    for f in node-tls.key node-signing.key api-server.key; do
        install -m 0600 "$node/$f" "$etc/certs/$f"
    done

    {
        echo "# Antar node $a of the compose federation; written by deploy/compose/make-certs.sh."
        echo "# Field names: crates/node/src/config.rs. Relative paths are relative to this file."
        echo "federation = \"$federation\""
        echo "agency = \"$a\""
        echo "data_dir = \"/var/lib/antar/data\""
        route=$(default_route_of "$a")
        if [[ -n $route ]]; then
            echo "# Agencies with no direct peering go through the hub."
            echo "default_route = \"$route\""
        fi
        cat <<EOF

[listen]
# 0.0.0.0 inside the container; compose.yaml publishes api, admin and metrics
# on the host's 127.0.0.1 only, and no peer port at all.
api = "0.0.0.0:$api_port"
peer = "0.0.0.0:$peer_port"
admin = "0.0.0.0:$admin_port"
metrics = "0.0.0.0:$metrics_port"

[tls]
federation_root = "certs/federation-root.crt"
node_cert = "certs/node-tls.crt"
node_key = "certs/node-tls.key"
signing_cert = "certs/node-signing.crt"
signing_key = "certs/node-signing.key"
local_ca = "certs/local-ca.crt"
api_cert = "certs/api-server.crt"
api_key = "certs/api-server.key"
# After \`antar pki revoke\`, copy pki/federation/revoked.crl here as
# certs/federation.crl, uncomment, and reload (SIGHUP; see deploy/README.md).
# revocation_list = "certs/federation.crl"
# Apps' and admins' certificates revoked with \`antar pki revoke --node-dir\`
# (local-revoked.crl), likewise:
# local_revocation_list = "certs/local-revoked.crl"
EOF
        for p in $(peers_of "$a"); do
            printf '\n[[peers]]\nagency = "%s"\naddr = "%s:%s"\n' "$p" "$p" "$peer_port"
        done
        cat <<'EOF'

# As in `antar dev`: the `dev` app owns every service and every agency may
# send to every service. Name real apps and services in production.
[[apps]]
name = "dev"
services = ["*"]

[[access]]
service = "*"
allow = ["*"]

[log]
format = "pretty"
level = "info"
EOF
    } >"$etc/node.toml"
    chmod 0644 "$etc/node.toml"
    echo "wrote $etc/node.toml and $etc/certs/"
done

# federation.json (the `antar dev` topology, ARCHITECTURE.md) for clients on the host. Paths are relative
# to this file's directory.
{
    echo "{"
    echo "  \"federation\": \"$federation\","
    echo "  \"root_ca\": \"pki/federation/root.crt\","
    echo "  \"agencies\": ["
    n=0
    for a in "${agencies[@]}"; do
        b=$(host_base "$a")
        n=$((n + 1))
        c="pki/$a/clients"
        sep=","
        [[ $n -eq ${#agencies[@]} ]] && sep=""
        cat <<EOF
    {
      "id": "$a",
      "api_addr": "127.0.0.1:$b",
      "peer_addr": "$a:$peer_port",
      "admin_addr": "127.0.0.1:$((b + 2))",
      "metrics_addr": "127.0.0.1:$((b + 3))",
      "api_ca": "pki/$a/local-ca.crt",
      "app_cert": "$c/app-dev.crt",
      "app_key": "$c/app-dev.key",
      "admin_cert": "$c/admin-dev.crt",
      "admin_key": "$c/admin-dev.key",
      "auditor_cert": "$c/auditor-dev.crt",
      "auditor_key": "$c/auditor-dev.key"
    }$sep
EOF
    done
    echo "  ]"
    echo "}"
} >"$out/federation.json"
chmod 0644 "$out/federation.json"
echo "wrote $out/federation.json"

cat <<EOF

Done. The containers run as uid/gid 65532 and the node keys are mode 0600,
so hand the per-node certificate bundles (only those) to that user before
starting:

  sudo chown -R 65532:65532 $out/*/etc/certs                # Docker (rootful)
  podman unshare chown -R 65532:65532 $out/*/etc/certs      # rootless Podman
  docker run --rm -u 0 -v "$out:/o" busybox sh -c 'chown -R 65532:65532 /o/*/etc/certs'   # rootless Docker

node.toml stays yours to edit; client keys under $out/pki stay yours, for
the antar CLI on the host.
EOF
