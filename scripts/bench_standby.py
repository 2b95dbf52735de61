"""Standby benchmark (BENCH_ONLY=standby; called by scripts/bench.py).

dr follow against Litestream 0.5.17's `restore -f`, side by side in one
run, on the same database and the same writer: both stream to a local
target (file replica) and to an S3 target (s3s-fs on loopback;
BENCH_STANDBY_TARGETS, default "local s3") with sync/follow intervals of
1 s, the writer commits BENCH_STANDBY_RATE small transactions a second
for BENCH_STANDBY_SECONDS, and a reader polls each follower's copy
read-only every 50 ms.

- lag: a commit's end to the first poll that sees it in the copy, p50/p99;
- read errors seen by the reader (a torn or locked copy);
- the follower's CPU (% of one core over the writer's run) and peak RSS;
- S3: the requests an idle follower makes, per hour (the source paused
  with SIGSTOP for BENCH_STANDBY_IDLE seconds; every request s3s-fs
  serves meanwhile is the follower's);
- failover: the source's processes killed with -9, then dr promote (or,
  for Litestream, killing its follower) and the first write accepted on
  the copy: the time from the kill to that write;
- at BENCH_STANDBY_BIG_MIB (default 8192; 0 skips it), dr alone: the
  same failover, beside a restore from scratch of the same database.
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
from bench_fleet import S3, litestream_bin
from bench_wal import WRITER, pct

MIB = int(os.environ.get("BENCH_STANDBY_MIB", "1024"))
SECONDS = float(os.environ.get("BENCH_STANDBY_SECONDS", "30"))
RATE = float(os.environ.get("BENCH_STANDBY_RATE", "200"))
TARGETS = os.environ.get("BENCH_STANDBY_TARGETS", "local s3").split()
IDLE = float(os.environ.get("BENCH_STANDBY_IDLE", "120"))
BIG_MIB = int(os.environ.get("BENCH_STANDBY_BIG_MIB", "8192"))


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


def run_dr(dr, d, db, s3=None):
    key = os.path.join(d, "k")
    rec = subprocess.run([dr, "keygen", "--output", key], check=True, capture_output=True, text=True).stdout.strip()
    open(os.path.join(d, "k.pub"), "w").write(rec + "\n")
    if s3:
        bucket = s3.bucket("standby-dr-" + os.path.basename(d))
        for name, val in (("id", s3.ak), ("secret", s3.sk)):
            p = os.path.join(d, name)
            open(p, "w").write(val + "\n")
            os.chmod(p, 0o600)
        tgt = (f'[targets.t]\nkind = "s3"\nendpoint = "http://127.0.0.1:{s3.port}"\n'
               f'bucket = "{os.path.basename(bucket)}"\npath_style = true\n'
               'access_key_id_file = "id"\nsecret_access_key_file = "secret"\n')
    else:
        tgt = '[targets.t]\nkind = "local"\npath = "backups"\n'
    base = 'policies = "{}"\n[encryption]\nrecipients_file = "k.pub"\n' + tgt
    open(os.path.join(d, "dr.toml"), "w").write('state_dir = "state"\n' + base.format("policies"))
    open(os.path.join(d, "b.toml"), "w").write('state_dir = "state-b"\n' + base.format("policies-b"))
    copy = os.path.join(d, "copy.db")
    pol = 'name = "app"\ntargets = ["t"]\n[source]\nkind = "sqlite"\npath = "{}"\n[wal]\nenabled = true\nsync_interval = "1s"\n'
    open(os.path.join(d, "policies", "app.toml"), "w").write(pol.format(db))
    open(os.path.join(d, "policies-b", "app.toml"), "w").write(pol.format(copy))
    src = launch([dr, "-c", os.path.join(d, "dr.toml"), "replicate"],
                 stdout=subprocess.DEVNULL, stderr=open(os.path.join(d, "replicate.log"), "w"))
    wait_for(lambda: "generation base committed" in open(os.path.join(d, "replicate.log")).read(), "dr's base", 900)
    t = time.time()
    # Each batch applied is logged with its lag (dr's follow module only:
    # the S3 client's debug lines would cost CPU the table measures).
    fol = launch([dr, "-c", os.path.join(d, "b.toml"), "follow", "app", "--identity", key],
                 stdout=subprocess.DEVNULL, stderr=open(os.path.join(d, "follow.log"), "w"),
                 env=dict(os.environ, DR_LOG="info,dr::ops::follow=debug"))
    wait_for(lambda: "following" in open(os.path.join(d, "follow.log")).read() and has_w(copy), "dr follow", 900)
    ready = time.time() - t

    def promote():
        r = subprocess.run([dr, "-c", os.path.join(d, "b.toml"), "promote", "app"], capture_output=True, text=True)
        if r.returncode != 0:
            sys.exit("dr promote failed: " + r.stderr)
    return src, fol, copy, ready, promote


def run_litestream(ls, d, db, s3=None):
    cfg = os.path.join(d, "litestream.yml")
    copy = os.path.join(d, "copy.db")
    if s3:
        bucket = os.path.basename(s3.bucket("standby-ls-" + os.path.basename(d)))
        replica = (f"      type: s3\n      bucket: {bucket}\n      path: app\n"
                   f"      endpoint: http://127.0.0.1:{s3.port}\n      region: us-east-1\n"
                   f"      force-path-style: true\n      access-key-id: {s3.ak}\n"
                   f"      secret-access-key: {s3.sk}\n      sync-interval: 1s\n")
        snap = os.path.join(s3.root, bucket, "app", "0009")
        restore = [ls, "restore", "-config", cfg, "-f", "-follow-interval", "1s", "-o", copy, db]
    else:
        target = os.path.join(d, "replica")
        replica = f"      url: file://{target}\n      sync-interval: 1s\n"
        snap = os.path.join(target, "ltx", "9")
        restore = [ls, "restore", "-f", "-follow-interval", "1s", "-o", copy, f"file://{target}"]
    open(cfg, "w").write(f"dbs:\n  - path: {db}\n    replica:\n{replica}")
    # Litestream's S3 client cannot start with AWS_CA_BUNDLE set.
    env = {k: v for k, v in os.environ.items() if k != "AWS_CA_BUNDLE"}
    src = launch([ls, "replicate", "-config", cfg], stdout=subprocess.DEVNULL,
                 stderr=open(os.path.join(d, "replicate.log"), "w"), env=env)
    # Its snapshot is the level-9 LTX file; a restore before it exits.
    wait_for(lambda: os.path.isdir(snap) and os.listdir(snap), "Litestream's snapshot", 900)
    t = time.time()
    fol = None

    def follower_up():
        nonlocal fol
        if fol is None or fol.poll() is not None:
            fol = launch(restore, stdout=subprocess.DEVNULL, stderr=open(os.path.join(d, "follow.log"), "a"), env=env)
        return has_w(copy)
    wait_for(follower_up, "litestream restore -f", 900)
    ready = time.time() - t

    def promote():
        fol.send_signal(signal.SIGTERM)
        fol.wait(timeout=60)
    return src, fol, copy, ready, promote


def one(name, start, d, db, s3=None, seconds=SECONDS):
    src, fol, copy, ready, promote = start(d, db)
    reader = Reader(copy)
    reader.start()
    c0, t0 = cpu_seconds(fol.pid), time.time()
    subprocess.run([sys.executable, "-c", WRITER, db, str(seconds), str(RATE)], check=True,
                   capture_output=True, text=True)
    cpu = (cpu_seconds(fol.pid) - c0) / (time.time() - t0) * 100
    time.sleep(5)
    reader.stop = True
    reader.join()
    rss = peak_rss_mib(fol.pid)
    ls_ = lags(db, reader.seen)
    # An idle follower's requests: the source paused, so every request the
    # server sees is the follower's.
    idle = None
    if s3 is not None and IDLE > 0:
        src.send_signal(signal.SIGSTOP)
        time.sleep(3)
        m0, t0 = s3.mark(), time.time()
        time.sleep(IDLE)
        idle = s3.requests(m0, s3.mark()) / (time.time() - t0) * 3600
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
    # dr logs each batch applied with the age of its newest transaction:
    # how much of the lag was spent before the segment reached the target.
    applied = []
    log = os.path.join(d, "follow.log")
    if name == "dr" and os.path.exists(log):
        for line in open(log, errors="replace"):
            if " applied" in line and "lag_seconds=" in line:
                try:
                    applied.append(float(line.split("lag_seconds=")[1].split()[0]))
                except ValueError:
                    pass
    return {"p50": pct(ls_, 50), "p99": pct(ls_, 99), "seen": len(ls_), "commits": commits,
            "errors": reader.errors, "cpu": cpu, "rss": rss, "rto": rto, "ready": ready, "idle": idle,
            "applied50": pct(applied, 50) if applied else None, "applied99": pct(applied, 99) if applied else None}


def table(dr, work):
    src = os.path.join(work, f"standby-{MIB}m.db")
    make_db(src, MIB / 1024)
    ls = litestream_bin(work)
    runs = int(os.environ.get("BENCH_RUNS", "3"))
    rows = []
    for where in TARGETS:
        s3 = S3(work) if where == "s3" else None
        try:
            res = {"dr": [], "litestream": []}
            for i in range(runs):
                for name in (("dr", "litestream") if i % 2 == 0 else ("litestream", "dr")):
                    d, db = fresh(work, f"{name}-{where}-{i}", src)
                    if name == "dr":
                        start = (lambda d, db: run_dr(dr, d, db, s3))
                    else:
                        start = (lambda d, db: run_litestream(ls, d, db, s3))
                    res[name].append(one(name, start, d, db, s3))
                    shutil.rmtree(d, ignore_errors=True)
        finally:
            if s3:
                s3.stop()
        rows += target_rows(where, res)
    if BIG_MIB:
        rows += big_rows(dr, work)
    caption = (f"Standby, {os.cpu_count()} cores, {MIB} MiB database, targets {' and '.join(TARGETS)} "
               f"(S3: s3s-fs on loopback), sync and follow intervals 1 s (dr's idle wait up to 15 s), "
               f"writer {RATE:.0f} tx/s for {SECONDS:.0f} s, medians of {runs} alternating runs.")
    head = ("case", "Litestream 0.5.17 restore -f", "dr follow", "ratio", "target")
    return caption, head, rows


def target_rows(where, res):
    rows = []

    def cell(name, key, fmt, unit):
        return spread([r[key] for r in res[name]], fmt, unit)

    def ratio(key):
        a = [r[key] for r in res["dr"]]
        b = [r[key] for r in res["litestream"]]
        xs = [x / y for x, y in zip(a, b) if y]
        # Litestream at 0 (no CPU measured in a short run): no ratio.
        return spread(xs, "{:.2f}", "x") if xs else "-"

    lag_target = "<= sync_interval + 0.5 s = 1.5 s" if where == "local" else "<= sync_interval + 1.5 s = 2.5 s"
    seen = sum(r["seen"] for r in res["dr"]), sum(r["commits"] for r in res["dr"])
    rows.append((f"{where}: lag commit -> visible on the copy, p50 ({seen[0]} of {seen[1]} dr commits seen)",
                 cell("litestream", "p50", "{:.2f}", " s"), cell("dr", "p50", "{:.2f}", " s"), ratio("p50"), "-"))
    rows.append((f"{where}: lag p99", cell("litestream", "p99", "{:.2f}", " s"), cell("dr", "p99", "{:.2f}", " s"),
                 ratio("p99"), lag_target + ", <= Litestream"))
    if all(r["applied50"] is not None for r in res["dr"]):
        rows.append((f"{where}: dr only, age of a segment's newest transaction when the follower applied it, p50 / p99",
                     "-", cell("dr", "applied50", "{:.2f}", " s") + " / " + cell("dr", "applied99", "{:.2f}", " s"),
                     "-", "-"))
    rows.append((f"{where}: read errors on the copy (reader every 50 ms)", cell("litestream", "errors", "{:.0f}", ""),
                 cell("dr", "errors", "{:.0f}", ""), "-", "0"))
    rows.append((f"{where}: follower CPU while the writer runs ({RATE:.0f} tx/s)",
                 cell("litestream", "cpu", "{:.1f}", "%"), cell("dr", "cpu", "{:.1f}", "%"), ratio("cpu"),
                 "<= Litestream"))
    rows.append((f"{where}: follower peak RSS", cell("litestream", "rss", "{:.0f}", " MiB"),
                 cell("dr", "rss", "{:.0f}", " MiB"), ratio("rss"), "-"))
    if all(r["idle"] is not None for r in res["dr"] + res["litestream"]):
        rows.append((f"{where}: requests an idle follower makes, per hour",
                     cell("litestream", "idle", "{:.0f}", ""), cell("dr", "idle", "{:.0f}", ""), ratio("idle"),
                     "a few a minute"))
    rows.append((f"{where}: initial restore to a readable copy ({MIB} MiB)",
                 cell("litestream", "ready", "{:.2f}", " s"), cell("dr", "ready", "{:.2f}", " s"), ratio("ready"),
                 "-"))
    rows.append((f"{where}: failover, kill -9 of the source -> first write on the copy (dr promote; Litestream: stop its follower)",
                 cell("litestream", "rto", "{:.2f}", " s"), cell("dr", "rto", "{:.2f}", " s"), ratio("rto"),
                 "<= 5 s"))
    return rows


def big_rows(dr, work):
    """dr alone at BIG_MIB: failover by promotion beside a restore from
    scratch, on a local target (one run: it takes minutes)."""
    src = os.path.join(work, f"standby-{BIG_MIB}m.db")
    make_db(src, BIG_MIB / 1024)
    d, db = fresh(work, f"dr-big-{BIG_MIB}", src)
    try:
        r = one("dr", lambda d, db: run_dr(dr, d, db), d, db, None, 10)
        out = os.path.join(d, "scratch.db")
        t = time.time()
        subprocess.run([dr, "-c", os.path.join(d, "b.toml"), "restore-local", "app", "--to", out,
                        "--identity", os.path.join(d, "k")], check=True, capture_output=True)
        scratch = time.time() - t
    finally:
        shutil.rmtree(d, ignore_errors=True)
    return [
        (f"{BIG_MIB} MiB, local: failover by dr promote, kill -9 -> first write", "-", f"{r['rto']:.2f} s", "-",
         "<= 5 s, as at 1 GiB"),
        (f"{BIG_MIB} MiB, local: the same database restored from scratch (dr restore-local)", "-",
         f"{scratch:.2f} s", f"{scratch / r['rto']:.0f}x the failover" if r["rto"] else "-", "-"),
        (f"{BIG_MIB} MiB, local: lag p99 with the writer at {RATE:.0f} tx/s", "-", f"{r['p99']:.2f} s", "-",
         "<= 1.5 s"),
    ]
