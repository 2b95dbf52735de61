"""PostgreSQL benchmark (called by scripts/bench.py; BENCH_ONLY=pg runs it alone):
full and diff backups of a pgbench cluster (BENCH_PG_SCALE, default 200)
through `dr backup-local` against the same pgBackRest commands run by hand
with dr's generated config; then dr's pgBackRest settings (zst, process-max
= cores, bundling) against pgBackRest's defaults (gz, one process) and
against dr's settings before process-max (zst, one process), each into a
repository of its own, full backups alternating; then the WAL archive of a
busy cluster (pgbench with 2 clients) with archive-async and process-max
against one synchronous push per segment.
"""
import json
import os
import shutil
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import spread  # noqa: E402

SCALE = int(os.environ.get("BENCH_PG_SCALE", "200"))


def pg(*args, **kw):
    return subprocess.run(["runuser", "-u", "postgres", "--", *args], check=True, capture_output=True, text=True, **kw)


def free_port():
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def rows(dr, work, runs):
    d = os.path.join(work, "pg")
    if os.path.exists(d):
        subprocess.run(["runuser", "-u", "postgres", "--", "pg_ctl", "-D", os.path.join(d, "cluster", "data"), "-m", "immediate", "stop"],
                       capture_output=True)
        shutil.rmtree(d)
    os.makedirs(os.path.join(d, "policies"))
    os.makedirs(os.path.join(d, "cluster", "sock"))
    subprocess.run(["chmod", "755", work, d], check=True)
    subprocess.run(["chown", "-R", "postgres:postgres", os.path.join(d, "cluster")], check=True)
    data = os.path.join(d, "cluster", "data")
    sock = os.path.join(d, "cluster", "sock")
    port = free_port()
    pg("initdb", "-D", data, "-U", "postgres", "--auth=trust", "-E", "UTF8", "--locale=C")
    with open(os.path.join(data, "postgresql.conf"), "a") as f:
        f.write(f"port = {port}\nlisten_addresses = ''\nunix_socket_directories = '{sock}'\n")
    log = os.path.join(d, "cluster", "pg.log")
    pg("pg_ctl", "-D", data, "-l", log, "-w", "-t", "60", "start")
    pass_file = os.path.join(d, "cipher.pass")
    open(pass_file, "w").write("bench-passphrase-0123456789abcdef\n")
    os.chmod(pass_file, 0o600)
    open(os.path.join(d, "dr.toml"), "w").write(
        'state_dir = "state"\n[encryption]\npassphrase_file = "cipher.pass"\n[targets.local]\nkind = "local"\npath = "backups"\n')
    open(os.path.join(d, "policies", "main.toml"), "w").write(
        f'name = "main-pg"\ntargets = ["local"]\n[source]\nkind = "postgres"\nstanza = "main"\ndata_dir = "{data}"\n'
        f'socket_dir = "{sock}"\nport = {port}\nuser = "postgres"\nrun_as = "postgres"\ncipher_pass_file = "{pass_file}"\n'
        '[retention]\nfull = 20\n')
    cfg = os.path.join(d, "dr.toml")
    try:
        print(f"pgbench -i -s {SCALE} ...", flush=True)
        pg("pgbench", "-i", "-s", str(SCALE), "-q", "-h", sock, "-p", str(port), "postgres")
        setup = json.loads(subprocess.run([dr, "-c", cfg, "pg", "setup", "main-pg", "--json"], check=True,
                                          capture_output=True, text=True).stdout)
        if setup["restart_needed"]:
            pg("pg_ctl", "-D", data, "-l", log, "-w", "-t", "60", "restart")
            subprocess.run([dr, "-c", cfg, "pg", "setup", "main-pg"], check=True, capture_output=True)
        conf = os.path.join(d, "state", "pg", "main-pg", "pgbackrest.conf")
        by_hand = ["runuser", "-u", "postgres", "--", "pgbackrest", f"--config={conf}", "--stanza=main", "backup", "--repo=1"]
        res = {"dr full": [], "hand full": [], "dr diff": [], "hand diff": []}

        def timed(cmd):
            t = time.time()
            subprocess.run(cmd, check=True, capture_output=True)
            return time.time() - t

        def churn():
            pg("pgbench", "-T", "3", "-c", "2", "-h", sock, "-p", str(port), "postgres")

        for i in range(runs):
            order = [("dr", [dr, "-c", cfg, "backup-local", "main-pg"]), ("hand", by_hand)]
            if i % 2:
                order.reverse()
            for who, cmd in order:
                res[f"{who} full"].append(timed(cmd + ["--type", "full"] if who == "dr" else cmd + ["--type=full"]))
                churn()
                res[f"{who} diff"].append(timed(cmd + ["--type", "diff"] if who == "dr" else cmd + ["--type=diff"]))
        out = []
        out += settings_rows(d, conf, runs)
        out += archive_rows(d, conf, sock, port, data)
        for kind in ("full", "diff"):
            h, dd = res[f"hand {kind}"], res[f"dr {kind}"]
            overhead = [(b / a - 1) * 100 for a, b in zip(h, dd)]
            out.append((f"PostgreSQL {kind} backup, pgbench scale {SCALE} (pgBackRest by hand vs through dr)",
                        spread(h), spread(dd), spread(overhead, "{:+.1f}", "% overhead"), "< 5%", "-", "-"))
        return out
    finally:
        subprocess.run(["runuser", "-u", "postgres", "--", "pg_ctl", "-D", data, "-m", "fast", "stop"], capture_output=True)


def variant_conf(d, conf, name, drop, add):
    """dr's pgbackrest.conf with its repository moved to a directory of its
    own, lines starting with any of `drop` removed and `add` appended to
    [global]; the stanza is created there."""
    repo = os.path.join(d, "variants", name)
    os.makedirs(repo, exist_ok=True)
    subprocess.run(["chown", "-R", "postgres:postgres", os.path.join(d, "variants")], check=True)
    out = []
    for line in open(conf).read().splitlines():
        if any(line.startswith(p) for p in drop):
            continue
        if line.startswith("repo1-path="):
            line = f"repo1-path={repo}"
        # Locks, logs and spool of its own: the cluster's asynchronous
        # archive push holds dr's stanza archive lock now and then.
        for key in ("lock-path", "log-path", "spool-path"):
            if line.startswith(key + "="):
                line = f"{key}={repo}-{key}"
        out.append(line)
        if line == "[global]":
            out += add
    path = os.path.join(d, f"variant-{name}.conf")
    open(path, "w").write("\n".join(out) + "\n")
    os.chmod(path, 0o600)
    subprocess.run(["chown", "postgres:postgres", path], check=True)
    pg("pgbackrest", f"--config={path}", "--stanza=main", "stanza-create")
    return path


def repo_size(path):
    info = json.loads(pg("pgbackrest", f"--config={path}", "--stanza=main", "--output=json", "info").stdout)
    return info[0]["backup"][-1]["info"]["repository"]["delta"]


def settings_rows(d, conf, runs):
    """Full backups with dr's settings now, pgBackRest's defaults, and dr's
    settings before process-max, alternating; archive-check is off for all
    three (their repositories get no WAL)."""
    cores = os.cpu_count()
    variants = {
        "dr now": variant_conf(d, conf, "now", ["process-max"], [f"process-max={cores}"]),
        "pgBackRest defaults": variant_conf(
            d, conf, "defaults", ["compress-type", "compress-level", "process-max", "repo1-bundle"], []),
        "dr before": variant_conf(d, conf, "before", ["process-max", "repo1-bundle"], ["process-max=1"]),
    }
    times = {k: [] for k in variants}
    sizes = {}
    for i in range(runs):
        names = list(variants) if i % 2 == 0 else list(reversed(list(variants)))
        for k in names:
            t = time.time()
            pg("pgbackrest", f"--config={variants[k]}", "--stanza=main", "--no-archive-check", "--type=full", "backup")
            times[k].append(time.time() - t)
            sizes[k] = repo_size(variants[k])
    now = times["dr now"]
    rows = []
    for k in ("pgBackRest defaults", "dr before"):
        r = [a / b for a, b in zip(now, times[k])]
        rows.append((f"PostgreSQL full backup, pgbench scale {SCALE}: dr's pgBackRest settings (zst 3, process-max={cores}, "
                     f"bundle) vs {k} ({'gz, process-max=1' if k.startswith('pgB') else 'zst 3, process-max=1'})",
                     spread(times[k]), spread(now), spread(r, "{:.2f}", "x"),
                     "<= 0.80x" if k == "dr before" else "-",
                     f"stored {sizes[k] / 1048576:.0f} MiB", f"stored {sizes['dr now'] / 1048576:.0f} MiB"))
    for p in variants.values():
        os.remove(p)
    shutil.rmtree(os.path.join(d, "variants"))
    return rows


def archive_rows(d, conf, sock, port, data):
    """A busy cluster's WAL archive: pgbench for 30 s, the backlog of
    segments waiting to be archived (`.ready` files) read every 0.5 s, and
    the time the archive takes to catch up after the load stops; with dr's
    settings (archive-async, process-max = cores) and with one synchronous
    push per segment (archive-async off, process-max=1)."""
    text = open(conf).read()
    ready_dir = os.path.join(data, "pg_wal", "archive_status")
    out = {}
    for name, edit in (("async", lambda t: t),
                       ("sync", lambda t: "\n".join(l for l in t.splitlines()
                                                    if not l.startswith(("archive-async", "process-max")))
                        + "\nprocess-max=1\n")):
        open(conf, "w").write(edit(text))
        load = subprocess.Popen(["runuser", "-u", "postgres", "--", "pgbench", "-T", "30", "-c", "2", "-h", sock,
                                 "-p", str(port), "postgres"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        backlog = []
        while load.poll() is None:
            backlog.append(sum(f.endswith(".ready") for f in os.listdir(ready_dir)))
            time.sleep(0.5)
        pg("psql", "-h", sock, "-p", str(port), "-c", "SELECT pg_switch_wal()", "postgres")
        t = time.time()
        while any(f.endswith(".ready") for f in os.listdir(ready_dir)) and time.time() - t < 300:
            time.sleep(0.2)
        out[name] = (max(backlog or [0]), time.time() - t)
    open(conf, "w").write(text)
    return [("PostgreSQL WAL archive of a busy cluster (pgbench -c 2, 30 s): most segments waiting, and catch-up "
             "after the load (one push per segment vs archive-async + process-max)",
             f"{out['sync'][0]} waiting, {out['sync'][1]:.1f} s", f"{out['async'][0]} waiting, {out['async'][1]:.1f} s",
             "-", "catch-up < archive_timeout (60 s)", "-", "-")]
