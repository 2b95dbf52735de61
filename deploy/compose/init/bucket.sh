#!/bin/sh
# Init step of docker-compose.yml: the bucket dr writes to, created once
# (an existing one is fine). Waits up to 60 s for the store to answer.
# The keys come from files (compose secrets), never from the command line.
set -eu
endpoint="${S3_ENDPOINT:-https://minio:9000}"
bucket="${S3_BUCKET:-dr-backups}"
AWS_ACCESS_KEY_ID="$(cat "${S3_ACCESS_KEY_ID_FILE:-/run/secrets/s3_access_key_id}")"
AWS_SECRET_ACCESS_KEY="$(cat "${S3_SECRET_ACCESS_KEY_FILE:-/run/secrets/s3_secret_access_key}")"
AWS_DEFAULT_REGION="${AWS_DEFAULT_REGION:-us-east-1}"
export AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY AWS_DEFAULT_REGION
i=0
while [ "$i" -lt 60 ]; do
  if aws --endpoint-url "$endpoint" s3api head-bucket --bucket "$bucket" >/dev/null 2>&1; then
    echo "bucket $bucket exists at $endpoint"
    exit 0
  fi
  if err="$(aws --endpoint-url "$endpoint" s3api create-bucket --bucket "$bucket" 2>&1 >/dev/null)"; then
    echo "bucket $bucket created at $endpoint"
    exit 0
  fi
  case "$err" in
    *InvalidBucketName*|*AccessDenied*|*InvalidAccessKeyId*|*SignatureDoesNotMatch*)
      echo "cannot create bucket $bucket at $endpoint: $err" >&2
      exit 1 ;;
  esac
  i=$((i + 1))
  sleep 1
done
echo "cannot create bucket $bucket at $endpoint: ${err:-no answer}" >&2
exit 1
