#!/usr/bin/env bash
# Makes a private CA, a server certificate and a client certificate for qllm's TLS / mutual TLS.
# For development and tests; in production use your PKI (cert-manager, Vault, ...). Needs openssl >= 1.1.1.
#
#   deploy/tls/gen-certs.sh OUTDIR [SAN ...]
#
# SANs default to DNS:localhost IP:127.0.0.1 IP:::1. For Kubernetes add the Service names the clients dial,
# e.g. DNS:qllm-router.qllm.svc.cluster.local DNS:qllm-worker-headless.qllm.svc.cluster.local
# DNS:*.qllm-worker-headless.qllm.svc.cluster.local.
# Writes OUTDIR/{ca,server,client}.{crt,key}; keys are mode 600. DAYS (default 365) sets the lifetime.
set -euo pipefail

if [[ $# -lt 1 || "$1" == -h || "$1" == --help ]]; then
    sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
fi
out=$1; shift
sans=("$@")
[[ ${#sans[@]} -gt 0 ]] || sans=(DNS:localhost IP:127.0.0.1 IP:::1)
days=${DAYS:-365}
san_list=$(IFS=,; echo "${sans[*]}")

mkdir -p "$out"
umask 077
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

newkey=(-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes)

openssl req -x509 "${newkey[@]}" -keyout "$out/ca.key" -out "$out/ca.crt" -days "$days" \
    -subj "/CN=qllm private CA" \
    -addext "basicConstraints=critical,CA:TRUE,pathlen:0" \
    -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null

issue() {  # name, common name, extendedKeyUsage, subjectAltName
    local name=$1 cn=$2 eku=$3 san=$4
    openssl req "${newkey[@]}" -keyout "$out/$name.key" -out "$tmp/$name.csr" -subj "/CN=$cn" 2>/dev/null
    {
        echo "basicConstraints=critical,CA:FALSE"
        echo "keyUsage=critical,digitalSignature,keyEncipherment"
        echo "extendedKeyUsage=$eku"
        [[ -n "$san" ]] && echo "subjectAltName=$san"
    } > "$tmp/$name.ext"
    openssl x509 -req -in "$tmp/$name.csr" -CA "$out/ca.crt" -CAkey "$out/ca.key" -CAcreateserial \
        -CAserial "$tmp/ca.srl" -out "$out/$name.crt" -days "$days" -sha256 -extfile "$tmp/$name.ext" 2>/dev/null
}

issue server "${sans[0]#*:}" serverAuth,clientAuth "$san_list"
issue client "qllm client" clientAuth ""
chmod 644 "$out"/*.crt
echo "wrote $out/{ca,server,client}.{crt,key} (server SANs: $san_list)"
