"""dr benchmark driver: see scripts/bench. Wall time and peak RSS via /usr/bin/time."""
import json
import os
import shutil
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DR = os.path.join(ROOT, "target", "release", "dr")
WORK = os.path.abspath(os.environ.get("BENCH_DIR", os.path.join(ROOT, "bench-work")))
GIB = float(os.environ.get("BENCH_GIB", "1"))
RSS_GIB = float(os.environ.get("BENCH_RSS_GIB", "4"))
RUNS = int(os.environ.get("BENCH_RUNS", "3"))


def sh(cmd, **kw):
    return subprocess.run(cmd, shell=True, check=True, **kw)


def timed(cmd):
    """Runs cmd (shell) under /usr/bin/time; returns (seconds, peak RSS MiB, stdout)."""
    out = os.path.join(WORK, "time.out")
    sh("sync")
    r = subprocess.run(
        ["/usr/bin/time", "-o", out, "-f", "%e %M", "bash", "-c", cmd],
        check=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    wall, rss = open(out).read().split()[-2:]
    return float(wall), int(rss) / 1024.0, r.stdout


def make_db(path, gib):
    marker = path + ".size"
    if os.path.exists(path) and os.path.exists(marker) and open(marker).read() == str(gib):
        return
    for p in (path, path + "-wal", path + "-shm"):
        if os.path.exists(p):
            os.remove(p)
    # ~390 bytes a row; hex text and repeated words compress about 2x, like real data.
    rows = int(gib * (1 << 30) / 390)
    print(f"generating {gib} GiB SQLite database ({rows} rows) ...", file=sys.stderr)
    sh(
        f"sqlite3 '{path}' \"PRAGMA journal_mode=WAL; CREATE TABLE t(id INTEGER PRIMARY KEY, name TEXT, payload TEXT, n INTEGER);"
        f" WITH RECURSIVE s(i) AS (SELECT 1 UNION ALL SELECT i+1 FROM s WHERE i < {rows})"
        " INSERT INTO t SELECT i, 'user-' || (i % 10000), hex(randomblob(150)) || ' status=active region=eu-west-1', i*7 FROM s;"
        " PRAGMA wal_checkpoint(TRUNCATE);\" >/dev/null"
    )
    open(marker, "w").write(str(gib))


def setup(name, db):
    d = os.path.join(WORK, name)
    if os.path.exists(d):
        shutil.rmtree(d)
    os.makedirs(os.path.join(d, "policies"))
    key = os.path.join(d, "bench.key")
    rec = subprocess.run([DR, "keygen", "--output", key], check=True, capture_output=True, text=True).stdout.strip()
    open(os.path.join(d, "bench.pub"), "w").write(rec + "\n")
    open(os.path.join(d, "dr.toml"), "w").write(
        'state_dir = "state"\n[encryption]\nrecipients_file = "bench.pub"\n'
        '[targets.local]\nkind = "local"\npath = "backups"\n'
    )
    open(os.path.join(d, "policies", "bench.toml"), "w").write(
        f'name = "bench"\ntargets = ["local"]\n[source]\nkind = "sqlite"\npath = "{db}"\n'
        '[compression]\nlevel = 3\n'
    )
    return d, key, rec


def write_table(name, title, head, rows):
    """A markdown table (under `title`, if any) on stdout and in WORK/name."""
    lines = ([title, ""] if title else []) + [
        "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    text = "\n".join(lines) + "\n"
    open(os.path.join(WORK, name), "w").write(text)
    print(text)


def wal_only():
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import bench_wal
    rows = bench_wal.rows(DR, WORK)
    head = ("case", "without dr", "with dr", "ratio", "target", "-", "-")
    write_table("results-wal.md", f"WAL streaming, {os.cpu_count()} cores, sync_interval 1s, local target.",
                head, rows)
    return rows


def main():
    os.makedirs(WORK, exist_ok=True)
    if os.environ.get("BENCH_ONLY") == "wal":
        wal_only()
        return
    if os.environ.get("BENCH_ONLY") == "fleet":
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import bench_fleet
        write_table("results-fleet.md", *bench_fleet.table(DR, WORK))
        return
    if os.environ.get("BENCH_ONLY") == "pitr":
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import bench_pitr
        write_table("results-pitr.md", *bench_pitr.table(DR, WORK))
        return
    if os.environ.get("BENCH_ONLY") == "pg":
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import bench_pg
        rows = bench_pg.rows(DR, WORK, RUNS)
        head = ("case", "pgBackRest by hand", "through dr", "overhead", "target", "-", "-")
        write_table("results-pg.md", None, head, rows)
        return
    db = os.path.join(WORK, f"bench-{GIB:g}g.db")
    make_db(db, GIB)
    d, key, rec = setup("cmp", db)
    cfg = os.path.join(d, "dr.toml")
    tmp = os.path.join(WORK, "pipeline.tmp.db")
    arch = os.path.join(WORK, "pipeline.zst.age")
    out1 = os.path.join(WORK, "pipeline.restored.db")
    out2 = os.path.join(WORK, "dr.restored.db")

    res = {k: [] for k in ("pb", "db", "pr", "pc", "dres", "zc")}
    size_pipe = 0
    full_json = None
    for i in range(RUNS):
        # Alternate order so neither side always runs with a warmer cache.
        steps = [("pb", f"sqlite3 '{db}' '.backup {tmp}' && zstd -q -3 -T0 -c '{tmp}' | age -r {rec} > '{arch}'"),
                 ("db", f"'{DR}' -c '{cfg}' backup-local bench --type full --json")]
        if i % 2:
            steps.reverse()
        for k, cmd in steps:
            w, r, out = timed(cmd)
            res[k].append((w, r))
            if k == "db":
                full_json = json.loads(out)[0]
        # The floor of any level-3 backup here: zstd alone on the copy.
        res["zc"].append(timed(f"zstd -q -3 -T0 -c '{tmp}' > /dev/null")[:2])
        os.remove(tmp)
        size_pipe = os.path.getsize(arch)
        # The same pipeline with the checks dr makes on every restore: sha256 of
        # the stored and the restored bytes, integrity_check, fsync.
        checked = (f"rm -f '{out1}' && openssl dgst -sha256 '{arch}' >/dev/null"
                   f" && age -d -i '{key}' '{arch}' | zstd -q -d -c > '{out1}'"
                   f" && openssl dgst -sha256 '{out1}' >/dev/null"
                   f" && sqlite3 'file:{out1}?immutable=1' 'PRAGMA integrity_check' | grep -qx ok"
                   f" && sync '{out1}'")
        steps = [("pr", f"rm -f '{out1}' && age -d -i '{key}' '{arch}' | zstd -q -d -c > '{out1}'"),
                 ("pc", checked),
                 ("dres", f"rm -f '{out2}' && '{DR}' -c '{cfg}' restore-local bench --to '{out2}' --identity '{key}' --force")]
        if i % 2:
            steps.reverse()
        for k, cmd in steps:
            res[k].append(timed(cmd)[:2])

    # Diff after ~1% of pages changed (rows are ~10 to a page: one page in a hundred).
    sh(f"sqlite3 '{db}' 'UPDATE t SET n = n + 1 WHERE (id / 10) % 100 = 0;' >/dev/null")
    wd, rd, out = timed(f"'{DR}' -c '{cfg}' backup-local bench --type diff --json")
    diff_json = json.loads(out)[0]
    for p in (out1, out2, arch):
        if os.path.exists(p):
            os.remove(p)

    def med(k, i):
        return statistics.median(x[i] for x in res[k])

    rows = []
    pb, dbk, pr, dr_ = med("pb", 0), med("db", 0), med("pr", 0), med("dres", 0)
    rows.append(("full backup", f"{pb:.2f} s", f"{dbk:.2f} s", f"{dbk / pb:.2f}x", "<= 0.70x",
                 f"{med('pb', 1):.0f} MiB", f"{med('db', 1):.0f} MiB"))
    zc = med("zc", 0)
    rows.append(("zstd -3 -T0 alone on the .backup copy (compression's own cost)", "-", f"{zc:.2f} s",
                 f"{zc / pb:.2f}x of pipeline", "-", "-", f"{med('zc', 1):.0f} MiB"))
    rows.append(("restore (dr: + hash checks, integrity_check, fsync)", f"{pr:.2f} s", f"{dr_:.2f} s",
                 f"{dr_ / pr:.2f}x", "<= 1.25x", f"{med('pr', 1):.0f} MiB", f"{med('dres', 1):.0f} MiB"))
    pc = med("pc", 0)
    rows.append(("restore vs the pipeline + the same checks (sha256 both sides, integrity_check, sync)",
                 f"{pc:.2f} s", f"{dr_:.2f} s", f"{dr_ / pc:.2f}x", "-", f"{med('pc', 1):.0f} MiB",
                 f"{med('dres', 1):.0f} MiB"))
    pct = 100.0 * diff_json["pages_stored"] / diff_json["page_count"]
    rows.append((f"diff after {pct:.1f}% of pages changed", "-", f"{wd:.2f} s",
                 f"{wd / dbk:.2f}x of dr full", "<= 0.15x", "-", f"{rd:.0f} MiB"))
    rows.append(("stored size: diff vs full", "-", f"{diff_json['stored_size'] / 1048576:.1f} MiB",
                 f"{diff_json['stored_size'] / full_json['stored_size']:.3f}x", "<= 0.03x", "-", "-"))
    rows.append(("stored size: full", f"{size_pipe / 1048576:.0f} MiB", f"{full_json['stored_size'] / 1048576:.0f} MiB",
                 f"{full_json['stored_size'] / size_pipe:.2f}x", "-", "-", "-"))

    if RSS_GIB > 0:
        big = os.path.join(WORK, f"bench-{RSS_GIB:g}g.db")
        make_db(big, RSS_GIB)
        d2, key2, _ = setup("rss", big)
        cfg2 = os.path.join(d2, "dr.toml")
        wb, rb, _ = timed(f"'{DR}' -c '{cfg2}' backup-local bench --type full")
        out3 = os.path.join(WORK, "rss.restored.db")
        wr, rr, _ = timed(f"rm -f '{out3}' && '{DR}' -c '{cfg2}' restore-local bench --to '{out3}' --identity '{key2}'")
        os.remove(out3)
        shutil.rmtree(d2)
        rows.append((f"{RSS_GIB:g} GiB full backup (memory check)", "-", f"{wb:.2f} s", "-", "< 100 MiB", "-", f"{rb:.0f} MiB"))
        rows.append((f"{RSS_GIB:g} GiB restore (memory check)", "-", f"{wr:.2f} s", "-", "< 100 MiB", "-", f"{rr:.0f} MiB"))

    if os.environ.get("BENCH_RESTIC", "1") != "0":
        rows += restic_rows(db, cfg, key)
    if os.environ.get("BENCH_S3", "1") != "0":
        rows += s3_rows(db)
    if os.environ.get("BENCH_PG", "1") != "0":
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import bench_pg
        rows += bench_pg.rows(DR, WORK, RUNS)
    if os.environ.get("BENCH_WAL", "1") != "0":
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import bench_wal
        rows += bench_wal.rows(DR, WORK)
    if os.environ.get("BENCH_PITR", "1") != "0":
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import bench_pitr
        rows += bench_pitr.rows(DR, WORK)

    head = ("case", "pipeline", "dr", "ratio", "target", "pipeline peak RSS", "dr peak RSS")
    lines = [f"Database: {os.path.getsize(db) / 1048576:.0f} MiB SQLite (WAL), median of {RUNS} runs, "
             f"{os.cpu_count()} cores. Pipeline: sqlite3 .backup + zstd -3 -T0 + age -r; restore: age -d | zstd -d.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    text = "\n".join(lines) + "\n"
    open(os.path.join(WORK, "results.md"), "w").write(text)
    print(text)


def restic_rows(db, cfg, key):
    """dr against restic 0.14 (repository v2, compression auto), the tool a
    user would pick instead: the first backup (restic's is its full: after
    `sqlite3 .backup`, as restic cannot read a live database consistently)
    and a restore of the whole database, alternating, median of RUNS."""
    repo = os.path.join(WORK, "restic-repo")
    snap_dir = os.path.join(WORK, "restic-src")
    out_dir = os.path.join(WORK, "restic-out")
    out2 = os.path.join(WORK, "dr.restored.db")
    env = dict(os.environ, RESTIC_PASSWORD="bench", RESTIC_CACHE_DIR=os.path.join(WORK, "restic-cache"),
               RESTIC_REPOSITORY=repo)
    for d in (repo, snap_dir, out_dir, env["RESTIC_CACHE_DIR"]):
        shutil.rmtree(d, ignore_errors=True)
    os.makedirs(snap_dir)
    os.environ.update(env)
    try:
        sh("restic init --repository-version 2 -q")
        snap = os.path.join(snap_dir, "app.db")
        wb, rb, _ = timed(f"sqlite3 '{db}' '.backup {snap}' && restic backup -q --compression auto '{snap}'")
        wd, rd, _ = timed(f"'{DR}' -c '{cfg}' backup-local bench --type full")
        res = {"restic": [], "dr": []}
        for i in range(RUNS):
            steps = [("restic", f"rm -rf '{out_dir}' && restic restore -q latest --target '{out_dir}'"),
                     ("dr", f"rm -f '{out2}' && '{DR}' -c '{cfg}' restore-local bench --to '{out2}' --identity '{key}' --force")]
            if i % 2:
                steps.reverse()
            for k, cmd in steps:
                res[k].append(timed(cmd)[:2])
    finally:
        for k in env:
            if k.startswith("RESTIC_"):
                os.environ.pop(k, None)
    for d in (repo, snap_dir, out_dir):
        shutil.rmtree(d, ignore_errors=True)
    if os.path.exists(out2):
        os.remove(out2)

    def med(k, i):
        return statistics.median(x[i] for x in res[k])

    rt, dt = med("restic", 0), med("dr", 0)
    return [
        ("vs restic 0.14: first backup (restic: sqlite3 .backup + restic backup)", f"{wb:.2f} s", f"{wd:.2f} s",
         f"{wd / wb:.2f}x", "-", f"{rb:.0f} MiB", f"{rd:.0f} MiB"),
        ("vs restic 0.14: restore (dr: + integrity_check, fsync)", f"{rt:.2f} s", f"{dt:.2f} s",
         f"{dt / rt:.2f}x", "<= 0.70x", f"{med('restic', 1):.0f} MiB", f"{med('dr', 1):.0f} MiB"),
    ]


def s3_rows(db):
    """dr backup-s3/restore-s3 against `aws s3 cp` of an equal-sized file, to s3s-fs on loopback."""
    import socket
    import time
    s3root = os.path.join(WORK, "s3root")
    if os.path.exists(s3root):
        shutil.rmtree(s3root)
    os.makedirs(os.path.join(s3root, "bench"))
    with socket.socket() as so:
        so.bind(("127.0.0.1", 0))
        port = so.getsockname()[1]
    ak, sk = "bench-access", "bench-secret-key-0123456789"
    s3fs = shutil.which("s3s-fs") or os.path.expanduser("~/.cargo/bin/s3s-fs")
    server = subprocess.Popen([s3fs, "--host", "127.0.0.1", "--port", str(port), "--access-key", ak,
                               "--secret-key", sk, s3root], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(500):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.02)
        d, key, rec = setup("s3", db)
        for name, val in (("id", ak), ("secret", sk)):
            p = os.path.join(d, name)
            open(p, "w").write(val + "\n")
            os.chmod(p, 0o600)
        with open(os.path.join(d, "dr.toml"), "a") as f:
            f.write(f'[targets.s3]\nkind = "s3"\nendpoint = "http://127.0.0.1:{port}"\nbucket = "bench"\n'
                    'path_style = true\naccess_key_id_file = "id"\nsecret_access_key_file = "secret"\n')
        pol = os.path.join(d, "policies", "bench.toml")
        text = open(pol).read().replace('targets = ["local"]', 'targets = ["s3"]')
        open(pol, "w").write(text)
        cfg = os.path.join(d, "dr.toml")
        env = f"AWS_ACCESS_KEY_ID={ak} AWS_SECRET_ACCESS_KEY={sk} AWS_DEFAULT_REGION=us-east-1"
        ep = f"--endpoint-url http://127.0.0.1:{port}"
        out_aws = os.path.join(WORK, "aws.down.db")
        out_dr = os.path.join(WORK, "dr.s3.restored.db")
        up_aws, up_dr, down_aws, down_dr = [], [], [], []
        for i in range(RUNS):
            up_aws.append(timed(f"{env} aws {ep} s3 cp --only-show-errors '{db}' s3://bench/copy.db")[:2])
            up_dr.append(timed(f"'{DR}' -c '{cfg}' backup-s3 bench --type full")[:2])
            down_aws.append(timed(f"rm -f '{out_aws}' && {env} aws {ep} s3 cp --only-show-errors s3://bench/copy.db '{out_aws}'")[:2])
            down_dr.append(timed(f"rm -f '{out_dr}' && '{DR}' -c '{cfg}' restore-s3 bench --to '{out_dr}' --identity '{key}'")[:2])
        for p in (out_aws, out_dr):
            if os.path.exists(p):
                os.remove(p)

        def m(xs, i):
            return statistics.median(x[i] for x in xs)
        return [
            ("S3 upload: aws s3 cp of the database vs dr backup-s3 (compress + encrypt + upload)",
             f"{m(up_aws, 0):.2f} s", f"{m(up_dr, 0):.2f} s", f"{m(up_dr, 0) / m(up_aws, 0):.2f}x", "<= 1.00x",
             f"{m(up_aws, 1):.0f} MiB", f"{m(up_dr, 1):.0f} MiB (< 150)"),
            ("S3 download: aws s3 cp vs dr restore-s3 (download + decrypt + checks)",
             f"{m(down_aws, 0):.2f} s", f"{m(down_dr, 0):.2f} s", f"{m(down_dr, 0) / m(down_aws, 0):.2f}x", "<= 1.00x",
             f"{m(down_aws, 1):.0f} MiB", f"{m(down_dr, 1):.0f} MiB (< 150)"),
        ]
    finally:
        server.kill()
        server.wait()
        shutil.rmtree(s3root, ignore_errors=True)


if __name__ == "__main__":
    main()
