"""What every benchmark shares: where dr and the work directory are, the
generated database and a dr setup for it, a command timed with the summed
peak memory of every process it starts, a median shown with its spread,
and the markdown table.

Imported by bench.py and the bench_*.py modules; imports none of them.
"""
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DR = os.path.join(ROOT, "target", "release", "dr")
WORK = os.path.abspath(os.environ.get("BENCH_DIR", os.path.join(ROOT, "bench-work")))
# Every row is the median of this many runs (at least 3 for a table).
RUNS = int(os.environ.get("BENCH_RUNS", "3"))


def sh(cmd, **kw):
    return subprocess.run(cmd, shell=True, check=True, **kw)


def make_db(path, gib, index=False):
    """A SQLite database of `gib` GiB in one table; with `index`, a secondary
    index too (what makes integrity_check, which matches every index entry
    with its row, cost more than quick_check)."""
    marker = path + ".size"
    want = str(gib) + (" index" if index else "")
    if os.path.exists(path) and os.path.exists(marker) and open(marker).read() == want:
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
        + (" CREATE INDEX t_name ON t(name, n);" if index else "")
        + " PRAGMA wal_checkpoint(TRUNCATE);\" >/dev/null"
    )
    open(marker, "w").write(want)


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
    # A cell may not hold a bare "|": it would end the cell.
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows]
    text = "\n".join(lines) + "\n"
    open(os.path.join(WORK, name), "w").write(text)
    print(text)


def _group_rss_kib(pgid):
    """Resident memory (KiB) of every process in group `pgid`, summed."""
    total = 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            stat = open(f"/proc/{pid}/stat").read()
            # pid (comm) state ppid pgrp ...: comm may hold spaces.
            if int(stat.rsplit(")", 1)[1].split()[2]) != pgid:
                continue
            for line in open(f"/proc/{pid}/status"):
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
                    break
        except (OSError, ValueError, IndexError):
            continue
    return total


def timed(cmd):
    """Runs `cmd` (bash) in a process group of its own after a `sync`;
    returns (wall seconds, peak RSS MiB, stdout). The peak is the larger of
    the group's summed RSS, sampled every 10 ms (a pipeline's processes
    run at once: their memory adds up), and the largest single process's
    exact peak from the kernel (what a sample may miss)."""
    subprocess.run("sync", shell=True, check=True)
    out = tempfile.TemporaryFile()
    t0 = time.monotonic()
    p = subprocess.Popen(["bash", "-c", cmd], stdout=out, stderr=subprocess.PIPE,
                         start_new_session=True)
    peak = [0]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _group_rss_kib(p.pid))
            done.wait(0.01)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    _, status, usage = os.wait4(p.pid, 0)
    wall = time.monotonic() - t0
    done.set()
    t.join()
    err = p.stderr.read().decode(errors="replace")
    p.stderr.close()
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode != 0:
        raise subprocess.CalledProcessError(p.returncode, cmd, stderr=err)
    out.seek(0)
    text = out.read().decode(errors="replace")
    out.close()
    return wall, max(peak[0], usage.ru_maxrss) / 1024.0, text


def med(xs):
    return statistics.median(xs)


def spread(xs, fmt="{:.2f}", unit=" s"):
    """`median unit (min–max)`; a single value alone."""
    m = fmt.format(med(xs))
    if len(xs) < 2:
        return m + unit
    return f"{m}{unit} ({fmt.format(min(xs))}–{fmt.format(max(xs))})"


def ratio(ours, theirs):
    """Median ratio and the spread of the per-run ratios (runs paired by index)."""
    rs = [a / b for a, b in zip(ours, theirs) if b > 0]
    return spread(rs, "{:.2f}", "x")


def stop(proc, timeout=60):
    """Stops a tool's process: SIGTERM, then SIGKILL after `timeout`."""
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def alternate(run, steps, res):
    """Times each (key, command) of `steps` into `res[key]` as (seconds,
    MiB), in the given order on even runs and reversed on odd ones, so no
    side always runs with a warmer cache."""
    for k, cmd in (steps if run % 2 == 0 else list(reversed(steps))):
        res[k].append(timed(cmd)[:2])
