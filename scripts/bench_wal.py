"""WAL streaming benchmark (called by scripts/bench.py; BENCH_ONLY=wal runs it alone).

- lag: commit -> segment on the target, p50/p99, under a writer pacing 500
  small transactions a second, with sync_interval = 1s. A commit's shipped
  time is the mtime of the first segment on the local target whose
  "covered until" time is at or after the commit.
- commit latency under the paced writer, and throughput of the same
  writer unpaced for 10 s, without and with `dr replicate` running (a
  paced writer's throughput is its pace: not a measure).
- RPO: writer and dr killed with SIGKILL together; newest commit in the
  source minus newest commit in a restore of the target.
"""
import os
import signal
import sqlite3
import subprocess
import sys
import time

from bench_common import RUNS, spread

WRITER = r'''
import sqlite3, sys, time
db, seconds, rate = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
c = sqlite3.connect(db, isolation_level=None, timeout=30)
c.execute("PRAGMA synchronous=NORMAL")
c.execute("PRAGMA busy_timeout=5000")
log = open(db + ".commits", "w")
n, start = 0, time.time()
while time.time() - start < seconds:
    t0 = time.time()
    c.execute("BEGIN")
    c.execute("INSERT INTO w(ts, v) VALUES (?, hex(randomblob(100)))", (time.time(),))
    c.execute("COMMIT")
    n += 1
    t1 = time.time()
    log.write(f"{t1:.6f} {t1 - t0:.6f}\n")
    if rate > 0:
        delay = start + n / rate - time.time()
        if delay > 0:
            time.sleep(delay)
log.close()
print(n)
'''


def fresh(work, dr):
    d = os.path.join(work, "wal")
    subprocess.run(["rm", "-rf", d], check=True)
    os.makedirs(os.path.join(d, "policies"))
    key = os.path.join(d, "k")
    rec = subprocess.run([dr, "keygen", "--output", key], check=True, capture_output=True, text=True).stdout.strip()
    open(os.path.join(d, "k.pub"), "w").write(rec + "\n")
    open(os.path.join(d, "dr.toml"), "w").write(
        'state_dir = "state"\n[encryption]\nrecipients_file = "k.pub"\n[targets.local]\nkind = "local"\npath = "backups"\n')
    db = os.path.join(d, "app.db")
    open(os.path.join(d, "policies", "app.toml"), "w").write(
        f'name = "app"\ntargets = ["local"]\n[source]\nkind = "sqlite"\npath = "{db}"\n'
        '[wal]\nenabled = true\nsync_interval = "1s"\n')
    c = sqlite3.connect(db)
    c.execute("PRAGMA journal_mode=WAL")
    c.execute("CREATE TABLE w(id INTEGER PRIMARY KEY, ts REAL, v TEXT)")
    c.execute("INSERT INTO w(ts, v) SELECT 0, hex(randomblob(100)) FROM (WITH RECURSIVE s(i) AS (SELECT 1 UNION ALL SELECT i+1 FROM s WHERE i < 100000) SELECT i FROM s)")
    c.commit()
    c.close()
    return d, db, key


def replicate(dr, d):
    p = subprocess.Popen([dr, "-c", os.path.join(d, "dr.toml"), "replicate"],
                         stdout=subprocess.DEVNULL, stderr=open(os.path.join(d, "replicate.log"), "w"))
    deadline = time.time() + 30
    while not os.path.isdir(os.path.join(d, "backups", "app", "backup")) or not any(
            os.path.exists(os.path.join(r, "manifest.json")) for r, _, _ in os.walk(os.path.join(d, "backups", "app", "backup"))):
        if time.time() > deadline:
            sys.exit("dr replicate took no base backup: see " + os.path.join(d, "replicate.log"))
        time.sleep(0.1)
    return p


def writer(db, seconds, rate):
    out = subprocess.run([sys.executable, "-c", WRITER, db, str(seconds), str(rate)], check=True,
                         capture_output=True, text=True).stdout
    return int(out.strip())


def segments(d):
    from datetime import datetime, timezone
    out = []
    root = os.path.join(d, "backups", "app", "wal")
    for r, _, files in os.walk(root):
        for f in files:
            if not f.endswith(".zst.age"):
                continue
            until = f.split("_")[2].replace(".zst.age", "")
            t = datetime.strptime(until, "%Y%m%dT%H%M%S.%fZ").replace(tzinfo=timezone.utc).timestamp()
            out.append((t, os.path.getmtime(os.path.join(r, f))))
    return sorted(out)


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100.0 * (len(xs) - 1))))]


def latencies(db):
    return [float(line.split()[1]) for line in open(db + ".commits")]


def rows(dr, work, runs=RUNS):
    """Each measure `runs` times, with and without dr alternating which
    goes first; medians with their spread."""
    out = []
    # The writer, paced at 500 small transactions a second for 20 s:
    # what dr costs is its commit latency (the throughput is the pace).
    lat = {False: [], True: []}
    for i in range(runs):
        for with_dr in ((False, True) if i % 2 == 0 else (True, False)):
            d, db, key = fresh(work, dr)
            p = replicate(dr, d) if with_dr else None
            writer(db, 20, 500)
            ls = latencies(db)
            lat[with_dr].append((pct(ls, 50) * 1e3, pct(ls, 99) * 1e3))
            if p:
                p.send_signal(signal.SIGTERM)
                p.wait(timeout=60)
    def lat_cell(xs):
        return (spread([x[0] for x in xs], "{:.2f}", " ms") + " / " +
                spread([x[1] for x in xs], "{:.2f}", " ms"))
    out.append(("writer at 500 tx/s: commit latency p50 / p99", lat_cell(lat[False]), lat_cell(lat[True]),
                "-", "-", "-", "-"))
    # Unpaced: as fast as one Python connection commits (4 KiB of WAL a commit).
    tput = {False: [], True: []}
    for i in range(runs):
        for with_dr in ((False, True) if i % 2 == 0 else (True, False)):
            d, db, key = fresh(work, dr)
            p = replicate(dr, d) if with_dr else None
            tput[with_dr].append(writer(db, 10, 0) / 10.0)
            if p:
                p.send_signal(signal.SIGTERM)
                p.wait(timeout=120)
    costs = [(1 - w / b) * 100 for b, w in zip(tput[False], tput[True])]
    out.append(("writer unpaced (max rate, 2 cores shared with dr)", spread(tput[False], "{:.0f}", " tx/s"),
                spread(tput[True], "{:.0f}", " tx/s"), spread(costs, "{:.1f}", "% cost"), "< 10%", "-", "-"))

    # Lag at 500 tx/s.
    p50s, p99s, n = [], [], 0
    for _ in range(runs):
        d, db, key = fresh(work, dr)
        p = replicate(dr, d)
        writer(db, 20, 500)
        time.sleep(2.5)
        p.send_signal(signal.SIGTERM)
        p.wait(timeout=60)
        segs = segments(d)
        lags = []
        for line in open(db + ".commits"):
            c = float(line.split()[0])
            shipped = [m for (u, m) in segs if u >= c]
            if shipped:
                lags.append(min(shipped) - c)
        p50s.append(pct(lags, 50))
        p99s.append(pct(lags, 99))
        n += len(lags)
    out.append((f"WAL lag commit -> target at 500 tx/s ({n} commits in {runs} runs)", "-",
                f"p50 {spread(p50s)}, p99 {spread(p99s)}", "-", "p99 < 1.5 s", "-", "-"))

    # RPO: kill -9 writer and dr together.
    rpos = []
    for _ in range(runs):
        d, db, key = fresh(work, dr)
        p = replicate(dr, d)
        w = subprocess.Popen([sys.executable, "-c", WRITER, db, "60", "500"], stdout=subprocess.DEVNULL)
        time.sleep(6.3)
        w.kill()
        p.kill()
        w.wait()
        p.wait()
        src = sqlite3.connect(db).execute("SELECT max(ts) FROM w").fetchone()[0]
        to = os.path.join(d, "restored.db")
        subprocess.run([dr, "-c", os.path.join(d, "dr.toml"), "restore-local", "app", "--to", to, "--identity", key],
                       check=True, capture_output=True)
        got = sqlite3.connect(to).execute("SELECT max(ts) FROM w").fetchone()[0]
        rpos.append(src - got)
    out.append((f"RPO after kill -9 of writer and dr together ({runs} runs)", "-",
                f"max {max(rpos):.2f} s, {spread(rpos)}", "-", "<= sync_interval + 1 s = 2 s", "-", "-"))
    return out
