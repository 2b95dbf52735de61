"""Standby benchmark (BENCH_ONLY=standby; called by scripts/bench.py).

dr follow against Litestream 0.5.17's `restore -f`, side by side in one
run, on the same database and the same writer: both stream to a local
target (file replica) with sync/follow intervals of 1 s, the writer
commits BENCH_STANDBY_RATE small transactions a second for
BENCH_STANDBY_SECONDS, and a reader polls each follower's copy read-only
every 50 ms.

- lag: a commit's end to the first poll that sees it in the copy, p50/p99;
- read errors seen by the reader (a torn or locked copy);
- the follower's CPU (% of one core over the writer's run) and peak RSS;
- failover: the source's processes killed with -9, then dr promote (or,
  for Litestream, killing its follower) and the first write accepted on
  the copy: the time from the kill to that write.
"""
import atexit
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time

from bench_common import make_db, spread
from bench_fleet import litestream_bin
from bench_wal import WRITER, pct

MIB = int(os.environ.get("BENCH_STANDBY_MIB", "1024"))
SECONDS = float(os.environ.get("BENCH_STANDBY_SECONDS", "30"))
RATE = float(os.environ.get("BENCH_STANDBY_RATE", "200"))


# Every process the bench starts: killed when it exits, however it exits
# (a timed-out wait included), so no streamer outlives a failed run.
_started = []


def launch(cmd, **kw):
    p = subprocess.Popen(cmd, **kw)
    _started.append(p)
    return p


@atexit.register
def _stop_all():
    for p in _started:
        if p.poll() is None:
            p.kill()
            p.wait()


def cpu_seconds(pid):
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


def peak_rss_mib(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def fresh(work, name, src):
    d = os.path.join(work, f"standby-{name}")
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(os.path.join(d, "policies"))
    os.makedirs(os.path.join(d, "policies-b"))
    db = os.path.join(d, "app.db")
    shutil.copyfile(src, db)
    c = sqlite3.connect(db)
    c.execute("PRAGMA journal_mode=WAL")
    c.execute("CREATE TABLE w(id INTEGER PRIMARY KEY, ts REAL, v TEXT)")
    c.commit()
    c.close()
    return d, db


class Reader(threading.Thread):
    """Polls the copy read-only every 50 ms: (time, newest ts seen)."""

    def __init__(self, copy):
        super().__init__(daemon=True)
        self.copy, self.seen, self.errors, self.stop = copy, [], 0, False

    def run(self):
        while not self.stop:
            try:
                c = sqlite3.connect(f"file:{self.copy}?mode=ro", uri=True, timeout=1)
                m = c.execute("SELECT max(ts) FROM w").fetchone()[0]
                c.close()
                self.seen.append((time.time(), m or 0.0))
            except sqlite3.Error:
                self.errors += 1
            time.sleep(0.05)


def lags(db, seen):
    out = []
    i = 0
    for line in open(db + ".commits"):
        # The writer logs each commit's end and how long it took; the row's
        # ts was taken at its start.
        end, took = (float(x) for x in line.split()[:2])
        while i < len(seen) and seen[i][1] < end - took - 1e-4:
            i += 1
        if i < len(seen):
            out.append(seen[i][0] - end)
    return out


def wait_for(cond, what, secs=120):
    deadline = time.time() + secs
    while not cond():
        if time.time() > deadline:
            sys.exit(f"standby bench: timed out waiting for {what}")
        time.sleep(0.1)


def has_w(copy):
    try:
        c = sqlite3.connect(f"file:{copy}?mode=ro", uri=True, timeout=1)
        c.execute("SELECT count(*) FROM w").fetchone()
        c.close()
        return True
    except sqlite3.Error:
        return False


def run_dr(dr, d, db):
    key = os.path.join(d, "k")
    rec = subprocess.run([dr, "keygen", "--output", key], check=True, capture_output=True, text=True).stdout.strip()
    open(os.path.join(d, "k.pub"), "w").write(rec + "\n")
    base = 'policies = "{}"\n[encryption]\nrecipients_file = "k.pub"\n[targets.local]\nkind = "local"\npath = "backups"\n'
    open(os.path.join(d, "dr.toml"), "w").write('state_dir = "state"\n' + base.format("policies"))
    open(os.path.join(d, "b.toml"), "w").write('state_dir = "state-b"\n' + base.format("policies-b"))
    copy = os.path.join(d, "copy.db")
    pol = 'name = "app"\ntargets = ["local"]\n[source]\nkind = "sqlite"\npath = "{}"\n[wal]\nenabled = true\nsync_interval = "1s"\n'
    open(os.path.join(d, "policies", "app.toml"), "w").write(pol.format(db))
    open(os.path.join(d, "policies-b", "app.toml"), "w").write(pol.format(copy))
    src = launch([dr, "-c", os.path.join(d, "dr.toml"), "replicate"],
                           stdout=subprocess.DEVNULL, stderr=open(os.path.join(d, "replicate.log"), "w"))
    wait_for(lambda: "generation base committed" in open(os.path.join(d, "replicate.log")).read(), "dr's base")
    t = time.time()
    fol = launch([dr, "-c", os.path.join(d, "b.toml"), "follow", "app", "--identity", key],
                           stdout=subprocess.DEVNULL, stderr=open(os.path.join(d, "follow.log"), "w"))
    wait_for(lambda: "following" in open(os.path.join(d, "follow.log")).read() and has_w(copy), "dr follow")
    ready = time.time() - t

    def promote():
        r = subprocess.run([dr, "-c", os.path.join(d, "b.toml"), "promote", "app"], capture_output=True, text=True)
        if r.returncode != 0:
            sys.exit("dr promote failed: " + r.stderr)
    return src, fol, copy, ready, promote


def run_litestream(ls, d, db):
    cfg = os.path.join(d, "litestream.yml")
    target = os.path.join(d, "replica")
    open(cfg, "w").write(f"dbs:\n  - path: {db}\n    replica:\n      url: file://{target}\n      sync-interval: 1s\n")
    src = launch([ls, "replicate", "-config", cfg], stdout=subprocess.DEVNULL,
                           stderr=open(os.path.join(d, "replicate.log"), "w"))
    # Its snapshot is the level-9 LTX file; a restore before it exits.
    snap = os.path.join(target, "ltx", "9")
    wait_for(lambda: os.path.isdir(snap) and os.listdir(snap), "Litestream's snapshot", 600)
    copy = os.path.join(d, "copy.db")
    t = time.time()
    fol = None

    def follower_up():
        nonlocal fol
        if fol is None or fol.poll() is not None:
            fol = launch([ls, "restore", "-f", "-follow-interval", "1s", "-o", copy, f"file://{target}"],
                                   stdout=subprocess.DEVNULL, stderr=open(os.path.join(d, "follow.log"), "a"))
        return has_w(copy)
    wait_for(follower_up, "litestream restore -f", 600)
    ready = time.time() - t

    def promote():
        fol.send_signal(signal.SIGTERM)
        fol.wait(timeout=60)
    return src, fol, copy, ready, promote


def one(name, start, d, db):
    src, fol, copy, ready, promote = start(d, db)
    reader = Reader(copy)
    reader.start()
    c0, t0 = cpu_seconds(fol.pid), time.time()
    subprocess.run([sys.executable, "-c", WRITER, db, str(SECONDS), str(RATE)], check=True,
                   capture_output=True, text=True)
    cpu = (cpu_seconds(fol.pid) - c0) / (time.time() - t0) * 100
    time.sleep(5)
    reader.stop = True
    reader.join()
    rss = peak_rss_mib(fol.pid)
    ls_ = lags(db, reader.seen)
    # Failover: the source host's processes die; the standby takes writes.
    src.kill()
    src.wait()
    k = time.time()
    promote()
    c = sqlite3.connect(copy, timeout=30)
    c.execute("INSERT INTO w(ts, v) VALUES (?, 'first write after failover')", (time.time(),))
    c.commit()
    c.close()
    rto = time.time() - k
    if fol.poll() is None:
        fol.send_signal(signal.SIGTERM)
        fol.wait(timeout=60)
    commits = sum(1 for _ in open(db + ".commits"))
    return {"p50": pct(ls_, 50), "p99": pct(ls_, 99), "seen": len(ls_), "commits": commits,
            "errors": reader.errors, "cpu": cpu, "rss": rss, "rto": rto, "ready": ready}


def table(dr, work):
    src = os.path.join(work, f"standby-{MIB}m.db")
    make_db(src, MIB / 1024)
    ls = litestream_bin(work)
    runs = int(os.environ.get("BENCH_RUNS", "3"))
    res = {"dr": [], "litestream": []}
    for i in range(runs):
        for name in (("dr", "litestream") if i % 2 == 0 else ("litestream", "dr")):
            d, db = fresh(work, name, src)
            start = (lambda d, db: run_dr(dr, d, db)) if name == "dr" else (lambda d, db: run_litestream(ls, d, db))
            res[name].append(one(name, start, d, db))
    rows = []

    def cell(name, key, fmt, unit):
        return spread([r[key] for r in res[name]], fmt, unit)

    def ratio(key):
        a = [r[key] for r in res["dr"]]
        b = [r[key] for r in res["litestream"]]
        xs = [x / y for x, y in zip(a, b) if y]
        # Litestream at 0 (no CPU measured in a short run): no ratio.
        return spread(xs, "{:.2f}", "x") if xs else "-"

    seen = sum(r["seen"] for r in res["dr"]), sum(r["commits"] for r in res["dr"])
    rows.append((f"lag commit -> visible on the copy, p50 ({seen[0]} of {seen[1]} dr commits seen)",
                 cell("litestream", "p50", "{:.2f}", " s"), cell("dr", "p50", "{:.2f}", " s"), ratio("p50"), "-"))
    rows.append(("lag p99", cell("litestream", "p99", "{:.2f}", " s"), cell("dr", "p99", "{:.2f}", " s"),
                 ratio("p99"), "<= sync_interval + 0.5 s = 1.5 s"))
    rows.append(("read errors on the copy (reader every 50 ms)", cell("litestream", "errors", "{:.0f}", ""),
                 cell("dr", "errors", "{:.0f}", ""), "-", "0"))
    rows.append((f"follower CPU while the writer runs ({RATE:.0f} tx/s)", cell("litestream", "cpu", "{:.1f}", "%"),
                 cell("dr", "cpu", "{:.1f}", "%"), ratio("cpu"), "<= Litestream"))
    rows.append(("follower peak RSS", cell("litestream", "rss", "{:.0f}", " MiB"), cell("dr", "rss", "{:.0f}", " MiB"),
                 ratio("rss"), "-"))
    rows.append((f"initial restore to a readable copy ({MIB} MiB)", cell("litestream", "ready", "{:.2f}", " s"),
                 cell("dr", "ready", "{:.2f}", " s"), ratio("ready"), "-"))
    rows.append(("failover: kill -9 of the source -> first write on the copy (dr promote; Litestream: stop its follower)",
                 cell("litestream", "rto", "{:.2f}", " s"), cell("dr", "rto", "{:.2f}", " s"), ratio("rto"), "<= 5 s"))
    caption = (f"Standby, {os.cpu_count()} cores, {MIB} MiB database, local target, sync and follow intervals 1 s, "
               f"writer {RATE:.0f} tx/s for {SECONDS:.0f} s, medians of {runs} alternating runs.")
    head = ("case", "Litestream 0.5.17 restore -f", "dr follow", "ratio", "target")
    return caption, head, rows
