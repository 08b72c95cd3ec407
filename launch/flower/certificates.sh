#!/usr/bin/env bash
# Test certificates for a local or trial deployment: a self-signed CA and a SuperLink
# certificate for 127.0.0.1 / localhost (add your coordinator's DNS name and IP to the SAN list
# for a real one, or use your institution's PKI).
#
#   bash launch/flower/certificates.sh OUT_DIR [EXTRA_SAN ...]   e.g. DNS:fl.example.org IP:10.0.0.5
#
# OUT_DIR/ca.crt      give to every SuperNode (--root-certificates) and to `flwr` (root-certificates)
# OUT_DIR/server.pem  SuperLink --ssl-certfile;  OUT_DIR/server.key  SuperLink --ssl-keyfile
# OUT_DIR/ca.crt      also SuperLink --ssl-ca-certfile
set -euo pipefail
out=${1:?usage: certificates.sh OUT_DIR [EXTRA_SAN ...]}
shift
san="DNS:localhost,IP:127.0.0.1,IP:::1"
for extra in "$@"; do san="$san,$extra"; done
mkdir -p "$out"
cd "$out"
openssl genrsa -out ca.key 3072 2>/dev/null
openssl req -new -x509 -key ca.key -sha256 -subj "/O=dplora_jax test CA/CN=dplora-test-ca" \
  -days 365 -out ca.crt
openssl genrsa -out server.key 2048 2>/dev/null
openssl req -new -key server.key -subj "/O=dplora_jax/CN=localhost" -out server.csr
printf "subjectAltName=%s\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n" \
  "$san" > server.ext
openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 365 -sha256 \
  -extfile server.ext -out server.pem 2>/dev/null
chmod 600 ca.key server.key
rm -f server.csr server.ext ca.srl
echo "wrote $out/ca.crt $out/server.pem $out/server.key (CA key: $out/ca.key)"
