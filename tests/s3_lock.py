"""Object Lock checks against a real S3 server (moto), with boto3:

  python3 s3_lock.py create BUCKET          bucket with Object Lock enabled
  python3 s3_lock.py head BUCKET KEY        prints "MODE RETAIN_UNTIL_EPOCH"
  python3 s3_lock.py delete BUCKET KEY      deletes the current version by id;
                                            prints "deleted" or the error code
  python3 s3_lock.py list BUCKET PREFIX     prints the keys under PREFIX, a line each
  python3 s3_lock.py mark BUCKET PREFIX     a plain DeleteObject (no version) of
                                            each key under PREFIX: delete markers
  python3 s3_lock.py unmark BUCKET PREFIX   removes the delete markers under PREFIX
  python3 s3_lock.py open-upload BUCKET KEY starts a multipart upload with one part
                                            and leaves it open, as a killed run does
  python3 s3_lock.py uploads BUCKET PREFIX  prints the open multipart uploads' keys
  python3 s3_lock.py plain BUCKET           bucket without Object Lock
  python3 s3_lock.py storage BUCKET KEY     prints "CLASS SSE KMS_KEY_ID" as the server
  python3 s3_lock.py put BUCKET KEY TEXT    writes TEXT at KEY (no lock headers)
                                            recorded them ("-" for none)

Endpoint and credentials come from S3_ENDPOINT, AWS_ACCESS_KEY_ID and
AWS_SECRET_ACCESS_KEY (the same keys dr uses).
"""
import os
import sys

import boto3
from botocore.exceptions import ClientError


def client():
    return boto3.client("s3", endpoint_url=os.environ["S3_ENDPOINT"], region_name="us-east-1")


def main():
    cmd, bucket = sys.argv[1], sys.argv[2]
    s3 = client()
    if cmd == "create":
        s3.create_bucket(Bucket=bucket, ObjectLockEnabledForBucket=True)
    elif cmd == "head":
        h = s3.head_object(Bucket=bucket, Key=sys.argv[3])
        until = h.get("ObjectLockRetainUntilDate")
        print(h.get("ObjectLockMode", "-"), int(until.timestamp()) if until else 0)
    elif cmd == "delete":
        key = sys.argv[3]
        version = s3.head_object(Bucket=bucket, Key=key).get("VersionId")
        try:
            s3.delete_object(Bucket=bucket, Key=key, VersionId=version)
            print("deleted")
        except ClientError as e:
            print(e.response["Error"]["Code"])
    elif cmd == "list":
        out = s3.list_objects_v2(Bucket=bucket, Prefix=sys.argv[3])
        for o in out.get("Contents", []):
            print(o["Key"])
    elif cmd == "mark":
        out = s3.list_objects_v2(Bucket=bucket, Prefix=sys.argv[3])
        for o in out.get("Contents", []):
            s3.delete_object(Bucket=bucket, Key=o["Key"])
            print(o["Key"])
    elif cmd == "unmark":
        out = s3.list_object_versions(Bucket=bucket, Prefix=sys.argv[3])
        for m in out.get("DeleteMarkers", []):
            s3.delete_object(Bucket=bucket, Key=m["Key"], VersionId=m["VersionId"])
            print(m["Key"])
    elif cmd == "open-upload":
        up = s3.create_multipart_upload(Bucket=bucket, Key=sys.argv[3])
        s3.upload_part(Bucket=bucket, Key=sys.argv[3], UploadId=up["UploadId"],
                       PartNumber=1, Body=b"x" * (5 * 1024 * 1024))
        print(up["UploadId"])
    elif cmd == "put":
        s3.put_object(Bucket=bucket, Key=sys.argv[3], Body=sys.argv[4].encode())
    elif cmd == "plain":
        s3.create_bucket(Bucket=bucket)
    elif cmd == "storage":
        h = s3.head_object(Bucket=bucket, Key=sys.argv[3])
        print(h.get("StorageClass", "STANDARD"), h.get("ServerSideEncryption", "-"),
              h.get("SSEKMSKeyId", "-"))
    elif cmd == "uploads":
        out = s3.list_multipart_uploads(Bucket=bucket, Prefix=sys.argv[3])
        for u in out.get("Uploads", []):
            print(u["Key"])
    else:
        sys.exit(f"unknown command {cmd}")


if __name__ == "__main__":
    main()
