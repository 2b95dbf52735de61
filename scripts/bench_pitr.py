"""Restore after long write bursts: dr against Litestream 0.5.17, side by
side in one run (BENCH_ONLY=pitr; also part of the full bench).

A BENCH_PITR_GIB (default 1) GiB WAL database, one copy per tool. Each tool
streams its copy to a local directory (dr: `dr replicate`, `[wal]
sync_interval = "1s"`, `diff_after` at its default, age; Litestream:
`litestream replicate DB file:///DIR`, defaults) while the same writer
updates 10 random rows a transaction, 200 transactions a second, for
each burst length in BENCH_PITR_BURSTS (default "20 60" seconds: the WAL
written grows threefold). Then the tool stops and its restore of the
newest state is timed; the restored table must equal the source's.

What it shows: a restore's time follows what it needs (the database and
the WAL after the newest backup), not how long the stream has run.
"""
import glob
import hashlib
import os
import random
import shutil
import sqlite3
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_common as bench  # noqa: E402
from bench_fleet import LITESTREAM_VERSION, litestream_bin  # noqa: E402

GIB = float(os.environ.get("BENCH_PITR_GIB", "1"))
BURSTS = [int(x) for x in os.environ.get("BENCH_PITR_BURSTS", "20 60").split()]
RATE = 200
ROWS_PER_TX = 10


def table_digest(db):
    h = hashlib.sha256()
    c = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    for row in c.execute("SELECT id, name, payload, n FROM t ORDER BY id"):
        h.update(repr(row).encode())
    c.close()
    return h.hexdigest()


def write_burst(db, seconds, seed):
    """Updates random rows at RATE transactions a second; returns the count."""
    rnd = random.Random(seed)
    c = sqlite3.connect(db, isolation_level=None, timeout=30)
    c.execute("PRAGMA synchronous=NORMAL")
    rows = c.execute("SELECT max(id) FROM t").fetchone()[0]
    start, n = time.time(), 0
    while time.time() - start < seconds:
        c.execute("BEGIN")
        for _ in range(ROWS_PER_TX):
            c.execute("UPDATE t SET n = n + 1, payload = hex(randomblob(150)) || ' status=active region=eu-west-1' WHERE id = ?",
                      (rnd.randint(1, rows),))
        c.execute("COMMIT")
        n += 1
        delay = start + n / RATE - time.time()
        if delay > 0:
            time.sleep(delay)
    c.close()
    return n


def burst_then_restore(tool, db, seconds, out, restore):
    """The writer's burst while `tool` streams, then the tool stops and
    `restore` (a shell command writing `out`) is timed. Returns the
    transactions written, the restore's seconds and peak RSS, and whether
    `out` equals the source."""
    n = write_burst(db, seconds, 1)
    time.sleep(3)
    bench.stop(tool, 120)
    want = table_digest(db)
    w, rss, _ = bench.timed(restore)
    return n, w, rss, table_digest(out) == want


def run_dr(dr, base, src, seconds):
    db = os.path.join(base, "app.db")
    shutil.copy(src, db)
    d, key, _ = bench.setup("pitr-dr", db)
    policy = os.path.join(d, "policies", "bench.toml")
    with open(policy, "a") as f:
        f.write('[wal]\nenabled = true\nsync_interval = "1s"\n')
    cfg = os.path.join(d, "dr.toml")
    log = open(os.path.join(base, "dr.log"), "w")
    p = subprocess.Popen([dr, "-c", cfg, "replicate"], stdout=log, stderr=log)
    # The generation's base full must be on the target before the burst.
    deadline = time.time() + 300
    while not glob_any(os.path.join(d, "backups", "bench", "backup", "*", "manifest*")):
        if time.time() > deadline or p.poll() is not None:
            raise SystemExit(f"dr took no base backup: see {log.name}")
        time.sleep(0.2)
    settle(os.path.join(d, "backups"), p, log.name)
    out = os.path.join(base, "dr.restored.db")
    n, w, rss, ok = burst_then_restore(
        p, db, seconds, out,
        f"rm -f '{out}' && '{dr}' -c '{cfg}' restore-local bench --to '{out}' --identity '{key}' --force")
    stored = dir_size(os.path.join(d, "backups"))
    diffs = len(glob_any(os.path.join(d, "backups", "bench", "backup", "*D", "manifest*")))
    shutil.rmtree(d)
    for p_ in (db, out):
        for f in (p_, p_ + "-wal", p_ + "-shm"):
            if os.path.exists(f):
                os.remove(f)
    return w, rss, ok, n, stored, diffs


def run_litestream(ls, base, src, seconds):
    db = os.path.join(base, "ls.db")
    shutil.copy(src, db)
    replica = os.path.join(base, "ls-replica")
    # Litestream keeps its own state beside the database: a run must not
    # start from the last one's.
    meta = os.path.join(base, ".ls.db-litestream")
    for d in (replica, meta):
        shutil.rmtree(d, ignore_errors=True)
    log = open(os.path.join(base, "litestream.log"), "w")
    p = subprocess.Popen([ls, "replicate", db, f"file://{replica}"], stdout=log, stderr=log)
    # Its first snapshot must be written before the burst.
    deadline = time.time() + 300
    while dir_size(replica) < 1 << 20:
        if time.time() > deadline or p.poll() is not None:
            raise SystemExit(f"Litestream wrote no snapshot: see {log.name}")
        time.sleep(0.2)
    settle(replica, p, log.name)
    out = os.path.join(base, "ls.restored.db")
    n, w, rss, ok = burst_then_restore(
        p, db, seconds, out, f"rm -f '{out}' && '{ls}' restore -o '{out}' 'file://{replica}'")
    stored = dir_size(replica)
    shutil.rmtree(replica)
    shutil.rmtree(meta, ignore_errors=True)
    for p_ in (db, out):
        for f in (p_, p_ + "-wal", p_ + "-shm"):
            if os.path.exists(f):
                os.remove(f)
    return w, rss, ok, n, stored


def settle(root, p, log):
    """Ready, the same way for both tools: what `root` holds has not
    changed for 2 s (the first full copy is written, not only begun)."""
    deadline = time.time() + 300
    last, since = -1, time.time()
    while time.time() - since < 2:
        size = dir_size(root)
        if size != last:
            last, since = size, time.time()
        if time.time() > deadline or p.poll() is not None:
            raise SystemExit(f"the first copy never settled: see {log}")
        time.sleep(0.2)


def glob_any(pattern):
    return glob.glob(pattern)


def dir_size(root):
    total = 0
    for dirpath, _, names in os.walk(root):
        for n in names:
            try:
                total += os.path.getsize(os.path.join(dirpath, n))
            except FileNotFoundError:
                pass
    return total


def rows(dr, work, runs=bench.RUNS):
    """Each burst `runs` times, the tools alternating which goes first."""
    ls = litestream_bin(work)
    base = os.path.join(work, "pitr")
    os.makedirs(base, exist_ok=True)
    src = os.path.join(work, f"bench-{GIB:g}g.db")
    bench.make_db(src, GIB)
    out = []
    for seconds in BURSTS:
        res = {"ls": [], "dr": []}
        diffs = []
        for i in range(runs):
            order = ("ls", "dr") if i % 2 == 0 else ("dr", "ls")
            for tool in order:
                if tool == "ls":
                    w, rss, ok, n, stored = run_litestream(ls, base, src, seconds)
                else:
                    w, rss, ok, n, stored, d = run_dr(dr, base, src, seconds)
                    diffs.append(d)
                if not ok:
                    raise SystemExit(f"a {tool} restore differs from its source after a {seconds} s burst")
                res[tool].append((w, rss, stored))
                print(f"burst {seconds}s run {i + 1}: {tool} {w:.2f}s ({n} tx)", file=sys.stderr)

        def col(k, j):
            return [x[j] for x in res[k]]
        out.append((f"restore of the newest state after a {seconds} s burst ({RATE} tx/s x {ROWS_PER_TX} random rows)",
                    bench.spread(col("ls", 0)), bench.spread(col("dr", 0)), bench.ratio(col("dr", 0), col("ls", 0)),
                    "<= 0.50x", bench.spread(col("ls", 1), "{:.0f}", " MiB"),
                    bench.spread(col("dr", 1), "{:.0f}", " MiB")))
        out.append((f"stored after the {seconds} s burst (dr: {min(diffs)}–{max(diffs)} diffs taken by diff_after)",
                    bench.spread([x / 1048576 for x in col("ls", 2)], "{:.0f}", " MiB"),
                    bench.spread([x / 1048576 for x in col("dr", 2)], "{:.0f}", " MiB"),
                    bench.ratio(col("dr", 2), col("ls", 2)), "-", "-", "-"))
    return out


def table(dr, work):
    head = ("case", f"Litestream {LITESTREAM_VERSION}", "dr", "dr / Litestream", "target",
            "Litestream peak RSS", "dr peak RSS")
    title = (f"Restore after write bursts, {GIB:g} GiB database, local replica, both tools "
             "in one run (dr: sync_interval 1s, diff_after auto, age; Litestream: defaults).")
    return title, head, rows(dr, work)
