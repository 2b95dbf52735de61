"""PostgreSQL benchmark (called by scripts/bench.py; BENCH_ONLY=pg runs it alone):
full and diff backups of a pgbench scale-50 cluster through `dr backup-local`
against the same pgBackRest commands run by hand with dr's generated config.
"""
import json
import os
import shutil
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import spread  # noqa: E402

SCALE = int(os.environ.get("BENCH_PG_SCALE", "50"))


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
        for kind in ("full", "diff"):
            h, dd = res[f"hand {kind}"], res[f"dr {kind}"]
            overhead = [(b / a - 1) * 100 for a, b in zip(h, dd)]
            out.append((f"PostgreSQL {kind} backup, pgbench scale {SCALE} (pgBackRest by hand vs through dr)",
                        spread(h), spread(dd), spread(overhead, "{:+.1f}", "% overhead"), "< 5%", "-", "-"))
        return out
    finally:
        subprocess.run(["runuser", "-u", "postgres", "--", "pg_ctl", "-D", data, "-m", "fast", "stop"], capture_output=True)
