"""Before/after benchmark of two dr builds, alternating, on one database.

    BENCH_BASELINE=/path/to/old/dr scripts/bench-compare

Runs full, diff and restore of a BENCH_GIB (default 1) GiB SQLite database
with the baseline binary and with target/release/dr, BENCH_RUNS rounds
(default 6), alternating which goes first each round so cache and disk
effects fall on both alike. Prints the medians and their ratio.
"""
import os
import statistics
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_common as bench  # noqa: E402  (helpers: timed runs, database generation, setup)

BASE = os.environ.get("BENCH_BASELINE")
if not BASE:
    sys.exit("set BENCH_BASELINE to the dr binary to compare against (a release build of an older commit)")
BINS = {"before": BASE, "after": bench.DR}
GIB = float(os.environ.get("BENCH_GIB", "1"))
RUNS = int(os.environ.get("BENCH_RUNS", "6"))


def main():
    os.makedirs(bench.WORK, exist_ok=True)
    db = os.path.join(bench.WORK, "compare.db")
    bench.make_db(db, GIB)
    envs = {}
    for name, binary in BINS.items():
        bench.DR = binary
        d, key, _ = bench.setup("compare-" + name, db)
        envs[name] = (d, key)
    res = {(n, k): [] for n in BINS for k in ("full", "diff", "restore")}

    def run(name, args):
        d, _ = envs[name]
        return bench.timed(f"{BINS[name]} --config {d}/dr.toml {args}")[0]

    for i in range(RUNS):
        order = list(BINS) if i % 2 == 0 else list(reversed(list(BINS)))
        for n in order:
            res[(n, "full")].append(run(n, "backup-local bench --type full"))
        subprocess.run(["sqlite3", db, f"UPDATE t SET n = n + 1 WHERE id % 100 = {i};"], check=True)
        for n in order:
            res[(n, "diff")].append(run(n, "backup-local bench --type diff"))
        for n in order:
            _, key = envs[n]
            out = os.path.join(bench.WORK, f"restored-{n}.db")
            res[(n, "restore")].append(run(n, f"restore-local bench --to {out} --identity {key}"))
            os.remove(out)
        print(f"round {i + 1}: " + ", ".join(f"{n}/{k} {v[-1]:.2f}s" for (n, k), v in res.items()), file=sys.stderr)
    print(f"| case ({GIB:g} GiB, median of {RUNS}, alternating) | before | after | after/before |")
    print("|---|---|---|---|")
    for k in ("full", "diff", "restore"):
        b = statistics.median(res[("before", k)])
        a = statistics.median(res[("after", k)])
        print(f"| {k} | {b:.2f} s | {a:.2f} s | {a / b:.2f} |")


if __name__ == "__main__":
    main()
