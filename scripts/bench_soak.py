"""The daemon under a busy fleet for a long while (BENCH_ONLY=soak): does its
memory stay flat, do its schedules hold, and does every database restore?

One fleet policy of BENCH_SOAK_DBS databases (default 60), a tenth of them
committing 20 transactions a second for the whole run, WAL streamed
(sync_interval 1s) to a local target, a full every 5 minutes, a diff every
minute, a restore drill every 3 minutes (as the soak of issue 25 that saw
RSS grow from 102 to 197 MiB in 16 minutes). The daemon's RSS is read once
a minute for BENCH_SOAK_MINUTES (default 60); the table gives the first
and last readings, the largest, and the growth over the second half (a
leak grows there too; warming up does not). Then every database is
restored and compared with its source.

BENCH_SOAK_SCHEDULE replaces the schedules ("full=0 */5 * * * *;verify=15
*/10 * * * *": 6-field cron, each `S * * * * *` or `S */N * * * *`), e.g.
for a fleet of 1,000 with fewer jobs.

Imports bench_common and bench_fleet (for the fleet and the writers).
"""
import os
import shutil
import sqlite3
import subprocess
import threading
import time

from bench_common import stop
import bench_fleet as bf


def soak(dr, work):
    n = int(os.environ.get("BENCH_SOAK_DBS", "60"))
    minutes = float(os.environ.get("BENCH_SOAK_MINUTES", "60"))
    base = os.path.join(work, "soak")
    if os.path.exists(base):
        shutil.rmtree(base)
    dbdir = os.path.join(base, "tenants")
    target = os.path.join(base, "replica")
    os.makedirs(target)
    os.makedirs(os.path.join(base, "policies"))
    bf.make_fleet(dbdir, n)
    key = os.path.join(base, "bench.key")
    rec = subprocess.run([dr, "keygen", "--output", key], check=True,
                         capture_output=True, text=True).stdout.strip()
    open(os.path.join(base, "bench.pub"), "w").write(rec + "\n")
    open(os.path.join(base, "dr.toml"), "w").write(
        'state_dir = "state"\n[encryption]\nrecipients_file = "bench.pub"\n'
        f'identity_file = "{key}"\n'
        f'[targets.t]\nkind = "local"\npath = "{target}"\n'
        '[daemon]\nlisten = "127.0.0.1:0"\n')
    open(os.path.join(base, "policies", "tenants.toml"), "w").write(
        'name = "tenants"\ntargets = ["t"]\n[source]\nkind = "sqlite"\n'
        f'path = "{dbdir}/*.db"\n[wal]\nenabled = true\nsync_interval = "1s"\n'
        '[schedule]\n' + "".join(f'{k} = "{v}"\n' for k, v in schedules().items()) +
        '[retention]\nfull = 2\n')
    log = open(os.path.join(base, "daemon.log"), "w")
    proc = subprocess.Popen([dr, "--config", os.path.join(base, "dr.toml"), "daemon"],
                            stdout=log, stderr=log, cwd=base, start_new_session=True)
    busy = sorted(os.path.join(dbdir, f) for f in os.listdir(dbdir) if f.endswith(".db"))[: max(1, n // 10)]
    seconds = minutes * 60
    writers = threading.Thread(target=bf.writers, args=(busy, seconds, 20))
    readings = []
    log_path = os.path.join(base, "daemon.log")
    try:
        time.sleep(20)
        # Errors are counted from here: a drill the daemon catches up at
        # start may run before the streamer's first bases (and says so).
        warm = os.path.getsize(log_path)
        writers.start()
        start = time.time()
        while time.time() - start < seconds:
            _, rss, threads = bf.proc_stats(proc.pid)
            readings.append((time.time() - start, rss, threads))
            time.sleep(min(60, max(0, seconds - (time.time() - start))))
        writers.join()
        _, rss, threads = bf.proc_stats(proc.pid)
        readings.append((time.time() - start, rss, threads))
        time.sleep(5)  # the last commits ship
    finally:
        stop(proc)
        log.close()
    with open(log_path) as f:
        f.seek(warm)
        errors = [l for l in f if " ERROR " in l]
    # Every database restored equals its source (the newest state).
    cfg = os.path.join(base, "dr.toml")
    wrong = []
    for db in sorted(f for f in os.listdir(dbdir) if f.endswith(".db")):
        out = os.path.join(base, "restored-" + db)
        r = subprocess.run([dr, "--config", cfg, "restore-local", "tenants", "--db", db[:-3],
                            "--to", out], capture_output=True, text=True)
        src = sqlite3.connect(os.path.join(dbdir, db)).execute("SELECT count(*), max(id) FROM w").fetchone()
        got = None
        if r.returncode == 0:
            got = sqlite3.connect(out).execute("SELECT count(*), max(id) FROM w").fetchone()
        if got != src:
            wrong.append(f"{db}: {got} vs {src} ({r.stderr.strip()[-200:]})")
    return readings, errors, wrong, n, minutes, lateness(os.path.join(base, "state", "history.db"))


def schedules():
    """The soak's schedules, 6-field cron: BENCH_SOAK_SCHEDULE, e.g.
    "full=0 */5 * * * *;verify=15 */10 * * * *", replaces the default."""
    text = os.environ.get("BENCH_SOAK_SCHEDULE",
                          "full=0 */5 * * * *;diff=30 * * * * *;verify=15 */3 * * * *")
    return dict(part.split("=", 1) for part in text.split(";") if part.strip())


def _period(cron):
    """(period, offset) in seconds of "S * * * * *" or "S */N * * * *"."""
    sec, minute = cron.split()[:2]
    return (60 * int(minute[2:]) if minute.startswith("*/") else 60), int(sec)


def lateness(history):
    """Per job kind: how long after its scheduled tick each database's
    scheduled run started (the daemon's history; its log beside it names
    the streamers' own diffs), over the runs after the first minute (the
    catch-up at start runs at once by design): (runs, median, max)."""
    # A streamer's own diffs (past wal.diff_after) are recorded as diffs
    # too, at no tick: the daemon's log names them, and they are left out.
    own = set()
    with open(os.path.join(os.path.dirname(os.path.dirname(history)), "daemon.log")) as f:
        for line in f:
            if "wal.diff_after" in line and "label=" in line:
                own.add(line.split("label=")[1].split()[0])
    rows = [(k, s) for k, s, label in sqlite3.connect(f"file:{history}?mode=ro", uri=True).execute(
        "SELECT kind, started, label FROM runs").fetchall() if label not in own]
    if not rows:
        return {}
    first = min(_epoch(s) for _, s in rows)
    out = {}
    for kind, cron in schedules().items():
        period, offset = _period(cron)
        late = sorted((t - offset) % period for t in (_epoch(s) for k, s in rows if k == kind)
                      if t - first > 60)
        if late:
            out[kind] = (len(late), late[len(late) // 2], late[-1])
    return out


def _epoch(stamp):
    # RFC 3339 with nanoseconds: Python's fromisoformat takes microseconds.
    head, _, frac = stamp.partition(".")
    digits = "".join(c for c in frac if c.isdigit())
    zone = frac[len(digits):] if frac else ""
    from datetime import datetime
    return datetime.fromisoformat(f"{head}.{digits[:6] or '0'}{zone}").timestamp()


def table(dr, work):
    readings, errors, wrong, n, minutes, late = soak(dr, work)
    rss = [r[1] for r in readings]
    half = [r for r in readings if r[0] >= readings[-1][0] / 2]
    growth = half[-1][1] - half[0][1] if len(half) > 1 else 0.0
    rows = [
        ("daemon RSS, first reading (MiB)", f"{rss[0]:.0f}"),
        ("daemon RSS, last reading (MiB)", f"{rss[-1]:.0f}"),
        ("daemon RSS, largest (MiB)", f"{max(rss):.0f}"),
        ("daemon RSS growth over the second half (MiB)", f"{growth:+.0f}"),
        ("daemon RSS, every reading (MiB)", " ".join(f"{x:.0f}" for x in rss)),
        ("threads, last reading", str(readings[-1][2])),
        ("errors in the daemon's log after the first 20 s", str(len(errors))),
        ("databases restored equal to their source", f"{n - len(wrong)} of {n}"),
    ]
    for kind, (runs, median, worst) in late.items():
        rows.append((f"{kind}: start after its schedule, median / max over {runs} runs (s)",
                     f"{median:.1f} / {worst:.1f}"))
    for w in wrong[:5]:
        rows.append(("not equal", w))
    for e in errors[:5]:
        rows.append(("error", e.strip()[:300]))
    title = (f"Soak, {os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}, `BENCH_ONLY=soak scripts/bench`: "
             f"dr daemon, one fleet of {n} databases, {max(1, n // 10)} writing 20 tx/s for {minutes:g} min, "
             "WAL streamed; " + ", ".join(f"{k} `{v}`" for k, v in schedules().items()) + "; RSS read each minute.")
    return title, ("measure", "dr"), rows
