#!/bin/sh
# Init step of docker-compose.yml: a private CA and a certificate for the S3
# store, in $CERTS_DIR (MinIO reads public.crt and private.key there; dr and
# the bucket step trust ca.crt). Names for the certificate: $S3_NAMES.
# Does nothing when they exist. The CA key is not kept.
set -eu
dir="${CERTS_DIR:-/certs}"
names="${S3_NAMES:-minio}"
if [ -s "$dir/public.crt" ] && [ -s "$dir/private.key" ] && [ -s "$dir/ca.crt" ]; then
  echo "certificates exist in $dir"
  exit 0
fi
mkdir -p "$dir/CAs"
umask 077
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
openssl req -x509 -newkey rsa:3072 -nodes -days 3650 -subj "/CN=dr private CA" \
  -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
  -keyout "$work/ca.key" -out "$dir/ca.crt" 2>/dev/null
san=""
for n in $(echo "$names" | tr ',' ' '); do
  case "$n" in
    *[!0-9.]*) san="$san${san:+,}DNS:$n" ;;
    *) san="$san${san:+,}IP:$n" ;;
  esac
done
first="$(echo "$names" | cut -d, -f1)"
openssl req -newkey rsa:2048 -nodes -subj "/CN=$first" \
  -keyout "$dir/private.key" -out "$work/server.csr" 2>/dev/null
printf 'subjectAltName=%s\nbasicConstraints=critical,CA:FALSE\nextendedKeyUsage=serverAuth\n' "$san" >"$work/server.ext"
openssl x509 -req -in "$work/server.csr" -CA "$dir/ca.crt" -CAkey "$work/ca.key" \
  -CAcreateserial -CAserial "$work/ca.srl" -days 825 -extfile "$work/server.ext" \
  -out "$dir/public.crt" 2>/dev/null
cp "$dir/ca.crt" "$dir/CAs/ca.crt"
chmod 0644 "$dir/ca.crt" "$dir/public.crt" "$dir/CAs/ca.crt"
echo "CA and certificate for $names in $dir"
