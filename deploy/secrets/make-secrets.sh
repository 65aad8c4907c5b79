#!/bin/sh
# Creates the secret files that docker-compose.yml mounts (each only if it does not exist yet), readable by you
# only; with a folder argument, there instead (deploy/k8s/secrets for the Kubernetes kustomization).
# The files stay out of git (.gitignore). Keys rotate by editing the key files in place: see deploy/README.md.
set -eu
dir="${1:-$(dirname "$0")}"
mkdir -p "$dir"
cd "$dir"
umask 077
token() { head -c 32 /dev/urandom | base64 | tr -d '/+=\n' | cut -c1-40; }
make() {
    if [ -e "$1" ]; then echo "kept    $1"; else printf '%s\n' "$2" > "$1"; echo "created $1"; fi
}
make redis_password.txt "$(token)"
make api_keys.txt "ug-user-$(token)"
make admin_keys.txt "ug-admin-$(token)"
make grafana_admin_password.txt "$(token)"
echo "API key for clients:   $(head -n1 api_keys.txt)"
echo "admin key (targets):   $(head -n1 admin_keys.txt)"
