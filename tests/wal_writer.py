"""Test writer for WAL streaming: commits rows stamped with their commit
time in bursts, and in each quiet gap records the instant and a digest of
the whole table, which is the reference state a restore at that instant
must equal.

  python3 wal_writer.py write DB MARKS BURSTS ROWS GAP_MS PAD [options]
  python3 wal_writer.py digest DB

Options: --big-at K BYTES   one transaction of BYTES before burst K
         --vacuum-at K      delete 3 of 4 rows and VACUUM before burst K
         --pause-file F     before each burst, wait while F exists
"""
import hashlib
import os
import sqlite3
import sys
import time


def digest(conn):
    h = hashlib.sha256()
    n = 0
    for row in conn.execute("SELECT id, ts, burst, hex(pad) FROM w ORDER BY id"):
        h.update(repr(row).encode())
        n += 1
    return f"{n}:{h.hexdigest()}"


def write(db, marks, bursts, rows, gap_ms, pad, opts):
    conn = sqlite3.connect(db, isolation_level=None, timeout=30)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(
        "CREATE TABLE IF NOT EXISTS w(id INTEGER PRIMARY KEY, ts REAL, burst INT, pad BLOB)"
    )
    out = open(marks, "a", buffering=1)
    for b in range(bursts):
        pause = opts.get("--pause-file")
        while pause and os.path.exists(pause):
            time.sleep(0.05)
        if opts.get("--big-at") and int(opts["--big-at"][0]) == b:
            total = int(opts["--big-at"][1])
            conn.execute("BEGIN")
            for _ in range(total // 8000):
                conn.execute(
                    "INSERT INTO w(ts, burst, pad) VALUES (?, ?, randomblob(8000))",
                    (time.time(), b),
                )
            conn.execute("COMMIT")
        if opts.get("--vacuum-at") and int(opts["--vacuum-at"][0]) == b:
            conn.execute("DELETE FROM w WHERE id % 4 != 0")
            conn.execute("VACUUM")
        for _ in range(rows):
            conn.execute("BEGIN")
            conn.execute(
                "INSERT INTO w(ts, burst, pad) VALUES (?, ?, randomblob(?))",
                (time.time(), b, pad),
            )
            conn.execute("COMMIT")
        time.sleep(gap_ms / 2000.0)
        out.write(f"{time.time():.3f} {b} {digest(conn)}\n")
        time.sleep(gap_ms / 2000.0)
    out.close()
    conn.close()


def main():
    if sys.argv[1] == "digest":
        print(digest(sqlite3.connect(sys.argv[2])))
        return
    db, marks, bursts, rows, gap_ms, pad = sys.argv[2:8]
    opts = {}
    rest = sys.argv[8:]
    i = 0
    while i < len(rest):
        if rest[i] == "--big-at":
            opts[rest[i]] = (rest[i + 1], rest[i + 2])
            i += 3
        elif rest[i] == "--vacuum-at":
            opts[rest[i]] = (rest[i + 1],)
            i += 2
        else:
            opts[rest[i]] = rest[i + 1]
            i += 2
    write(db, marks, int(bursts), int(rows), int(gap_ms), int(pad), opts)


if __name__ == "__main__":
    main()
