"""Preprocessing throughput and peak memory on FnApiRunner with 2 worker processes.

Cases: 1M and 2M synthetic events (targets: 1M in <= 60 s, 2M in <= 2.2x the 1M time), and a
hot key: one user with 1M events. Each case runs `seminar preprocess` as a subprocess; peak
memory is the largest sum of RSS over that process tree, sampled every 0.1 s.

    python benchmarks/preprocess.py [--out benchmarks/results] [--repeats 1]

Prints a table and writes ``preprocess.json`` and ``preprocess.png`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time

from seminar_tf.data import synth
from seminar_tf.data.readers import write_tables


def _tree_rss(pid: int) -> int:
    """Sum of RSS bytes of ``pid`` and all its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry))
        except (OSError, IndexError, ValueError):
            continue
    total, stack = 0, [pid]
    page = os.sysconf("SC_PAGE_SIZE")
    while stack:
        p = stack.pop()
        try:
            with open(f"/proc/{p}/statm") as f:
                total += int(f.read().split()[1]) * page
        except OSError:
            pass
        stack.extend(children.get(p, []))
    return total


def run_preprocess(raw_dir: str, out_dir: str) -> tuple[float, int, dict]:
    cmd = [
        sys.executable, "-m", "seminar_tf.cli", "preprocess",
        "--events", os.path.join(raw_dir, "events.parquet"),
        "--items", os.path.join(raw_dir, "items.parquet"),
        "--queries", os.path.join(raw_dir, "queries.parquet"),
        "--out", out_dir, "--max-len", "1000",
        "--direct_num_workers=2", "--direct_running_mode=multi_processing",
    ]  # fmt: skip
    t0 = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak = [0]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _tree_rss(proc.pid))
            time.sleep(0.1)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    _, err = proc.communicate()
    elapsed = time.time() - t0
    done.set()
    thread.join()
    if proc.returncode != 0:
        raise RuntimeError(f"preprocess failed:\n{err.decode()[-3000:]}")
    with open(os.path.join(out_dir, "stats.json")) as f:
        stats = json.load(f)
    return elapsed, peak[0], stats


def make_raw(raw_dir: str, n_events: int, hot_key: bool, seed: int = 0) -> int:
    if hot_key:
        cfg = synth.SynthConfig(num_users=1, min_events=n_events, max_events=n_events, seed=seed)
    else:
        # The default config yields ~433 events a user; ask for a little more and cut.
        cfg = synth.SynthConfig(num_users=int(n_events / 400) + 10, seed=seed)
    tables = synth.generate(cfg)
    tables["events"] = tables["events"].slice(0, n_events)
    write_tables(tables, raw_dir)
    return tables["events"].num_rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    cases = [("1M", 1_000_000, False), ("2M", 2_000_000, False), ("hot-key 1M", 1_000_000, True)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, n, hot in cases:
            raw = os.path.join(tmp, name.replace(" ", "_"), "raw")
            events = make_raw(raw, n, hot)
            times, peaks, stats = [], [], {}
            for r in range(args.repeats):
                out = os.path.join(tmp, name.replace(" ", "_"), f"out{r}")
                elapsed, peak, stats = run_preprocess(raw, out)
                times.append(elapsed)
                peaks.append(peak)
                print(f"  {name}: run {r + 1}: {elapsed:.1f}s, peak {peak / 2**20:.0f} MiB",
                      file=sys.stderr)  # fmt: skip
            med = statistics.median(times)
            rows.append(
                {
                    "case": name,
                    "events": events,
                    "users": stats["users"],
                    "seconds_median": round(med, 2),
                    "seconds_all": [round(t, 2) for t in times],
                    "events_per_second": round(events / med, 1),
                    "peak_rss_mib": round(max(peaks) / 2**20, 1),
                    "output_bytes_per_event": round(stats["output_bytes_per_event"], 2),
                    "accounting_ok": stats["accounting_ok"],
                }
            )
    t1 = rows[0]["seconds_median"]
    t2 = rows[1]["seconds_median"]
    report = {
        "benchmark": "preprocess",
        "runner": "FnApiRunner, --direct_num_workers=2 multi_processing",
        "machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}",
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "rows": rows,
        "ratio_2M_over_1M": round(t2 / t1, 3),
        "targets": {
            "1M_seconds_max": 60,
            "ratio_max": 2.2,
            "1M_met": t1 <= 60,
            "ratio_met": t2 / t1 <= 2.2,
        },
    }
    header = f"{'case':<12} {'events':>9} {'users':>6} {'sec':>7} {'ev/s':>9} {'peak MiB':>9} {'B/ev':>6}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['case']:<12} {r['events']:>9} {r['users']:>6} {r['seconds_median']:>7.1f} "
            f"{r['events_per_second']:>9.0f} {r['peak_rss_mib']:>9.0f} "
            f"{r['output_bytes_per_event']:>6.1f}"
        )
    print(f"2M / 1M time ratio: {report['ratio_2M_over_1M']:.2f} (target <= 2.2); "
          f"1M: {t1:.1f}s (target <= 60 s)")  # fmt: skip
    with open(os.path.join(args.out, "preprocess.json"), "w") as f:
        json.dump(report, f, indent=2)
    _plot(rows, os.path.join(args.out, "preprocess.png"))


def _plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    names = [r["case"] for r in rows]
    axes[0].bar(names, [r["seconds_median"] for r in rows], color="#4c72b0")
    axes[0].axhline(60, color="red", ls="--", lw=1, label="1M target 60 s")
    axes[0].set_ylabel("seconds (median)")
    axes[0].legend()
    axes[1].bar(names, [r["peak_rss_mib"] for r in rows], color="#dd8452")
    axes[1].set_ylabel("peak RSS, MiB (process tree)")
    fig.suptitle("seminar preprocess, FnApiRunner x2 workers")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
