"""dr benchmark driver: see scripts/bench. Every row is a median of RUNS
runs with its spread, the two sides alternating which goes first; peak
RSS is a pipeline's summed memory (bench_common.timed)."""
import json
import os
import shutil
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import DR, RUNS, WORK, alternate, make_db, ratio, setup, sh, spread, timed, write_table  # noqa: E402

GIB = float(os.environ.get("BENCH_GIB", "1"))
RSS_GIB = float(os.environ.get("BENCH_RSS_GIB", "4"))


def wal_only():
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import bench_wal
    rows = bench_wal.rows(DR, WORK, RUNS)
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
    if os.environ.get("BENCH_ONLY") == "soak":
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import bench_soak
        write_table("results-soak.md", *bench_soak.table(DR, WORK))
        return
    if os.environ.get("BENCH_ONLY") == "pitr":
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import bench_pitr
        write_table("results-pitr.md", *bench_pitr.table(DR, WORK))
        return
    if os.environ.get("BENCH_ONLY") == "standby":
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import bench_standby
        write_table("results-standby.md", *bench_standby.table(DR, WORK))
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

    res = {k: [] for k in ("pb", "db", "pr", "pc", "dres", "zc", "diff")}
    size_pipe = 0
    full_json = None
    diff_json = None
    for i in range(RUNS):
        # Alternate order so neither side always runs with a warmer cache.
        # Both make their archive durable: dr fsyncs its objects, the
        # pipeline's archive is synced.
        steps = [("pb", f"sqlite3 '{db}' '.backup {tmp}' && zstd -q -3 -T0 -c '{tmp}' | age -r {rec} > '{arch}'"
                        f" && sync '{arch}'"),
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
        # The same pipeline with the checks dr makes on every restore, run
        # as a user would script them, overlapped with the decode (tee):
        # sha256 of the stored and of the restored bytes, integrity_check,
        # and the restored file synced.
        checked = (f"rm -f '{out1}' && tee >(openssl dgst -sha256 >/dev/null) < '{arch}'"
                   f" | age -d -i '{key}' | zstd -q -d -c | tee >(openssl dgst -sha256 >/dev/null) > '{out1}'"
                   f" && sqlite3 'file:{out1}?immutable=1' 'PRAGMA integrity_check' | grep -qx ok"
                   f" && sync '{out1}'")
        alternate(i, [("pr", f"rm -f '{out1}' && age -d -i '{key}' '{arch}' | zstd -q -d -c > '{out1}'"),
                      ("pc", checked),
                      ("dres", f"rm -f '{out2}' && '{DR}' -c '{cfg}' restore-local bench --to '{out2}' "
                               f"--identity '{key}' --force")], res)
        # A diff after ~1% of pages changed (rows are ~10 to a page: one
        # page in a hundred), on top of this run's full.
        sh(f"sqlite3 '{db}' 'UPDATE t SET n = n + 1 WHERE (id / 10) % 100 = {i};' >/dev/null")
        w, r, out = timed(f"'{DR}' -c '{cfg}' backup-local bench --type diff --json")
        res["diff"].append((w, r))
        diff_json = json.loads(out)[0]
    for p in (out1, out2, arch):
        if os.path.exists(p):
            os.remove(p)

    def col(k, i):
        return [x[i] for x in res[k]]

    def mib(k):
        return spread(col(k, 1), "{:.0f}", " MiB")

    rows = []
    rows.append(("full backup", spread(col("pb", 0)), spread(col("db", 0)), ratio(col("db", 0), col("pb", 0)),
                 "<= 0.70x", mib("pb"), mib("db")))
    rows.append(("zstd -3 -T0 alone on the .backup copy (compression's own cost)", "-", spread(col("zc", 0)),
                 ratio(col("zc", 0), col("pb", 0)) + " of pipeline", "-", "-", mib("zc")))
    rows.append(("restore (dr: + hash checks, integrity_check, fsync)", spread(col("pr", 0)), spread(col("dres", 0)),
                 ratio(col("dres", 0), col("pr", 0)), "<= 1.25x", mib("pr"), mib("dres")))
    rows.append(("restore vs the pipeline + the same checks, overlapped (tee: sha256 both sides; integrity_check, sync)",
                 spread(col("pc", 0)), spread(col("dres", 0)), ratio(col("dres", 0), col("pc", 0)), "-",
                 mib("pc"), mib("dres")))
    pct = 100.0 * diff_json["pages_stored"] / diff_json["page_count"]
    rows.append((f"diff after {pct:.1f}% of pages changed", "-", spread(col("diff", 0)),
                 ratio(col("diff", 0), col("db", 0)) + " of dr full", "<= 0.15x", "-", mib("diff")))
    rows.append(("stored size: diff vs full", "-", f"{diff_json['stored_size'] / 1048576:.1f} MiB",
                 f"{diff_json['stored_size'] / full_json['stored_size']:.3f}x", "<= 0.03x", "-", "-"))
    rows.append(("stored size: full", f"{size_pipe / 1048576:.0f} MiB", f"{full_json['stored_size'] / 1048576:.0f} MiB",
                 f"{full_json['stored_size'] / size_pipe:.2f}x", "-", "-", "-"))

    if RSS_GIB > 0:
        big = os.path.join(WORK, f"bench-{RSS_GIB:g}g.db")
        make_db(big, RSS_GIB)
        d2, key2, _ = setup("rss", big)
        cfg2 = os.path.join(d2, "dr.toml")
        out3 = os.path.join(WORK, "rss.restored.db")
        big_b, big_r = [], []
        for _ in range(RUNS):
            big_b.append(timed(f"'{DR}' -c '{cfg2}' backup-local bench --type full")[:2])
            big_r.append(timed(f"rm -f '{out3}' && '{DR}' -c '{cfg2}' restore-local bench --to '{out3}' "
                               f"--identity '{key2}' --force")[:2])
        os.remove(out3)
        big_rows = []
        if os.environ.get("BENCH_RESTIC", "1") != "0":
            big_rows = restic_rows(big, cfg2, key2, f"{RSS_GIB:g} GiB")
        shutil.rmtree(d2)
        rows.append((f"{RSS_GIB:g} GiB full backup (memory check)", "-", spread([x[0] for x in big_b]), "-",
                     "< 100 MiB", "-", spread([x[1] for x in big_b], "{:.0f}", " MiB")))
        rows.append((f"{RSS_GIB:g} GiB restore (memory check)", "-", spread([x[0] for x in big_r]), "-",
                     "< 100 MiB", "-", spread([x[1] for x in big_r], "{:.0f}", " MiB")))
        rows += big_rows

    if os.environ.get("BENCH_RESTIC", "1") != "0":
        rows += restic_rows(db, cfg, key, f"{GIB:g} GiB")
        if os.environ.get("BENCH_INDEX", "1") != "0":
            # The same rows in a database with a secondary index, where the
            # drill's integrity_check is what a drilled restore skips.
            idx = os.path.join(WORK, f"bench-{GIB:g}g-index.db")
            make_db(idx, GIB, index=True)
            d3, key3, _ = setup("idx", idx)
            rows += restic_rows(idx, os.path.join(d3, "dr.toml"), key3, f"{GIB:g} GiB with an index")
            shutil.rmtree(d3)
    if os.environ.get("BENCH_S3", "1") != "0":
        rows += s3_rows(db)
    if os.environ.get("BENCH_PG", "1") != "0":
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import bench_pg
        rows += bench_pg.rows(DR, WORK, RUNS)
    if os.environ.get("BENCH_WAL", "1") != "0":
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import bench_wal
        rows += bench_wal.rows(DR, WORK, RUNS)
    if os.environ.get("BENCH_PITR", "1") != "0":
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import bench_pitr
        rows += bench_pitr.rows(DR, WORK, RUNS)

    head = ("case", "pipeline", "dr", "ratio", "target", "pipeline peak RSS", "dr peak RSS")
    import datetime
    lines = [f"{datetime.date.today()}, `scripts/bench`: database {os.path.getsize(db) / 1048576:.0f} MiB SQLite (WAL), "
             f"median of {RUNS} runs (min–max), sides alternating, {os.cpu_count()} cores. "
             "Pipeline: sqlite3 .backup + zstd -3 -T0 + age -r + sync; restore: age -d | zstd -d. "
             "Peak RSS of a pipeline: its processes summed.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows]
    text = "\n".join(lines) + "\n"
    open(os.path.join(WORK, "results.md"), "w").write(text)
    print(text)


def restic_rows(db, cfg, key, what):
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
        snap = os.path.join(snap_dir, "app.db")
        res = {"restic_b": [], "dr_b": [], "restic": [], "dr": []}
        for i in range(RUNS):
            # A first backup each: restic into a new repository, dr a full.
            shutil.rmtree(repo, ignore_errors=True)
            shutil.rmtree(env["RESTIC_CACHE_DIR"], ignore_errors=True)
            sh("restic init --repository-version 2 -q")
            if os.path.exists(snap):
                os.remove(snap)
            alternate(i, [("restic_b", f"sqlite3 '{db}' '.backup {snap}' && restic backup -q --compression auto '{snap}'"),
                          ("dr_b", f"'{DR}' -c '{cfg}' backup-local bench --type full")], res)
        # The scheduled drill of the newest backup, as the daemon runs it
        # (untimed): a restore of it then relies on the drill's
        # integrity_check and runs quick_check; `--check full` is the
        # restore with no drill to rely on.
        sh(f"'{DR}' -c '{cfg}' verify bench --identity '{key}' > /dev/null")
        res["dr_full"] = []
        for i in range(RUNS):
            alternate(i, [("restic", f"rm -rf '{out_dir}' && restic restore -q latest --target '{out_dir}'"),
                          ("dr", f"rm -f '{out2}' && '{DR}' -c '{cfg}' restore-local bench --to '{out2}' "
                                 f"--identity '{key}' --force"),
                          ("dr_full", f"rm -f '{out2}' && '{DR}' -c '{cfg}' restore-local bench --to '{out2}' "
                                      f"--identity '{key}' --force --check full")], res)
    finally:
        for k in env:
            if k.startswith("RESTIC_"):
                os.environ.pop(k, None)
    for d in (repo, snap_dir, out_dir):
        shutil.rmtree(d, ignore_errors=True)
    if os.path.exists(out2):
        os.remove(out2)

    def col(k, i):
        return [x[i] for x in res[k]]

    return [
        (f"vs restic 0.14, {what}: first backup (restic: sqlite3 .backup + restic backup into a new repository)",
         spread(col("restic_b", 0)), spread(col("dr_b", 0)), ratio(col("dr_b", 0), col("restic_b", 0)), "-",
         spread(col("restic_b", 1), "{:.0f}", " MiB"), spread(col("dr_b", 1), "{:.0f}", " MiB")),
        (f"vs restic 0.14, {what}: restore of a drilled backup (dr: + every page compared with the backup's hashes, "
         "quick_check, fsync)", spread(col("restic", 0)), spread(col("dr", 0)),
         ratio(col("dr", 0), col("restic", 0)), "<= 0.70x",
         spread(col("restic", 1), "{:.0f}", " MiB"), spread(col("dr", 1), "{:.0f}", " MiB")),
        (f"vs restic 0.14, {what}: restore with no drill to rely on (dr --check full: + integrity_check)",
         spread(col("restic", 0)), spread(col("dr_full", 0)),
         ratio(col("dr_full", 0), col("restic", 0)), "-",
         spread(col("restic", 1), "{:.0f}", " MiB"), spread(col("dr_full", 1), "{:.0f}", " MiB")),
    ]


def s3_rows(db):
    """dr backup-s3/restore-s3 against the pipeline a user would write around
    `aws s3 cp -` (compressed and encrypted alike), to s3s-fs on loopback."""
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
        tmp = os.path.join(WORK, "aws.backup.db")
        # The peer a user writes: the same pipeline as the local one,
        # streamed into `aws s3 cp -`, and back out of `aws s3 cp - ` into
        # age -d | zstd -d; both sides' restored file synced.
        put = (f"sqlite3 '{db}' '.backup {tmp}' && zstd -q -3 -T0 -c '{tmp}' | age -r {rec}"
               f" | {env} aws {ep} s3 cp --only-show-errors - s3://bench/copy.zst.age && rm -f '{tmp}'")
        get = (f"rm -f '{out_aws}' && {env} aws {ep} s3 cp --only-show-errors s3://bench/copy.zst.age -"
               f" | age -d -i '{key}' | zstd -q -d -c > '{out_aws}' && sync '{out_aws}'")
        res = {"up_aws": [], "up_dr": [], "down_aws": [], "down_dr": []}
        for i in range(RUNS):
            alternate(i, [("up_aws", put), ("up_dr", f"'{DR}' -c '{cfg}' backup-s3 bench --type full")], res)
            alternate(i, [("down_aws", get),
                          ("down_dr", f"rm -f '{out_dr}' && '{DR}' -c '{cfg}' restore-s3 bench --to '{out_dr}' "
                                      f"--identity '{key}'")], res)
        for p in (out_aws, out_dr, tmp):
            if os.path.exists(p):
                os.remove(p)

        def col(k, i):
            return [x[i] for x in res[k]]
        return [
            ("S3 upload: sqlite3 .backup, zstd, age into aws s3 cp - vs dr backup-s3",
             spread(col("up_aws", 0)), spread(col("up_dr", 0)), ratio(col("up_dr", 0), col("up_aws", 0)), "<= 1.00x",
             spread(col("up_aws", 1), "{:.0f}", " MiB"), spread(col("up_dr", 1), "{:.0f}", " MiB") + " (< 150)"),
            ("S3 download: aws s3 cp - into age -d, zstd -d vs dr restore-s3 (+ checks)",
             spread(col("down_aws", 0)), spread(col("down_dr", 0)), ratio(col("down_dr", 0), col("down_aws", 0)),
             "<= 1.00x", spread(col("down_aws", 1), "{:.0f}", " MiB"),
             spread(col("down_dr", 1), "{:.0f}", " MiB") + " (< 150)"),
        ]
    finally:
        server.kill()
        server.wait()
        shutil.rmtree(s3root, ignore_errors=True)


if __name__ == "__main__":
    main()
