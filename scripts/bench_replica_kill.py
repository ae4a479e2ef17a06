#!/usr/bin/env python
"""Kill one replica under load: what clients see.

Starts ``--replicas`` server-only engine servers (``python -m service``, embedded engine) behind
a gateway-only Envoy (``python -m gateway --upstream``), runs ``--clients`` REST clients sending
``/inference_sft`` streams back to back, ``kill -9``s the replica with the most active requests
after ``--before`` seconds, and goes on for ``--after`` seconds. Printed: requests ok / broken
(started streaming, then cut: no trailer) / failed before streaming; p50/p95 time to first byte
before and after the kill; Envoy's retry counters; how long until Envoy took the replica out.

    nice -n 10 .venv/bin/python scripts/bench_replica_kill.py --replicas 3 --clients 8 \\
        --before 20 --after 40
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from tests.replicas import Load, StreamResult, start_replica_set  # noqa: E402


def _quantiles(values: list[float]) -> str:
    if not values:
        return "n/a"
    values = sorted(values)
    p95 = values[min(len(values) - 1, round(0.95 * (len(values) - 1)))]
    return f"p50 {statistics.median(values):.2f} s  p95 {p95:.2f} s  (n={len(values)})"


def _counts(results: list[StreamResult]) -> str:
    c = Counter(r.outcome for r in results)
    return f"ok {c['ok']}  broken {c['broken']}  failed-before-start {c['failed']}"


def _retry_stats(admin_url: str) -> str:
    with urllib.request.urlopen(f"{admin_url}/stats?filter=^cluster.tts_grpc.(upstream_rq_retry"
                                "|upstream_rq_retry_success|upstream_rq_retry_overflow|"
                                "outlier_detection.ejections_enforced_total)$", timeout=60) as r:
        return "  ".join(line.removeprefix("cluster.tts_grpc.")
                         for line in r.read().decode().split("\n") if line)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--replicas", type=int, default=3)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--before", type=float, default=20.0, help="seconds of load before the kill")
    p.add_argument("--after", type=float, default=40.0, help="seconds of load after the kill")
    p.add_argument("--max-concurrent", type=int, default=2, help="syntheses per replica")
    p.add_argument("--threads", type=int, default=1, help="engine threads per replica")
    a = p.parse_args()
    print(f"load before: {os.getloadavg()[0]:.2f} (1-min average; {os.cpu_count()} cores)")
    with tempfile.TemporaryDirectory(prefix="bench-replica-kill-") as workdir:
        replica_set = start_replica_set(Path(workdir), a.replicas,
                                        max_concurrent=a.max_concurrent, threads=a.threads)
        try:
            load = Load(replica_set, a.clients).start()
            time.sleep(a.before)
            try:
                active = {h: int(s.get("rq_active", 0))
                          for h, s in replica_set.host_stats(timeout=10).items()}
            except OSError:  # Envoy's admin is slow to answer on a busy machine
                active = {}
            victim = max(replica_set.replicas, key=lambda r: active.get(r.address, 0))
            killed_at = time.monotonic()
            victim.kill()
            out_after = None
            while time.monotonic() - killed_at < a.after:
                try:
                    hosts = replica_set.host_stats(timeout=10)
                except OSError:  # a slow answer on a busy machine: ask again
                    continue
                flags = hosts.get(victim.address, {}).get("health_flags", "")
                if out_after is None and "failed" in flags:
                    out_after = time.monotonic() - killed_at
                time.sleep(0.2)
            results = load.stop()
            retries = _retry_stats(replica_set.admin_url)
        finally:
            replica_set.stop()
    before = [r for r in results if r.started < killed_at]
    after = [r for r in results if r.started >= killed_at]
    cut = [r for r in before if r.ended > killed_at]
    print(f"replicas {a.replicas}, clients {a.clients}, {a.max_concurrent} syntheses and "
          f"{a.threads} thread(s) per replica; killed {victim.address} with "
          f"{active.get(victim.address, 0)} active requests after {a.before:.0f} s")
    print(f"all requests:          {_counts(results)}")
    print(f"  started before kill: {_counts(before)}")
    print(f"    in flight at kill: {_counts(cut)}")
    print(f"  started after kill:  {_counts(after)}")
    print(f"TTFB before kill: {_quantiles([r.ttfb for r in before if r.outcome == 'ok'])}")
    print(f"TTFB after kill:  {_quantiles([r.ttfb for r in after if r.outcome == 'ok'])}")
    print(f"Envoy: {retries}")
    print("victim marked failed by Envoy after: "
          + (f"{out_after:.2f} s" if out_after is not None else "not within the run"))
    print(f"load after: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
