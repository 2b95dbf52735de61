# PostgreSQL 15 with pgBackRest, so archive_command can push WAL.
FROM postgres:15-bookworm
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends pgbackrest \
 && rm -rf /var/lib/apt/lists/*
