"""DuckDB's side of `ebb bench window`: the window aggregates ebb computes, over the same
Arrow data, on one thread. Prints one JSON line: rows, seconds (best of 3), records_per_s."""
import json
import sys
import time

import duckdb
import pyarrow as pa

QUERY = """
SELECT service, metric, window_start,
       count(value), sum(value), avg(value), min(value), max(value), stddev_samp(value),
       approx_quantile(value, 0.5), approx_quantile(value, 0.95), approx_quantile(value, 0.99),
       count(DISTINCT instance)
FROM (SELECT *, (ts_ms // 10000) * 10000 AS window_start FROM samples)
GROUP BY service, metric, window_start
"""


def main(path):
    with pa.memory_map(path) as source:
        table = pa.ipc.open_file(source).read_all()
    con = duckdb.connect()
    con.execute("SET threads = 1")
    con.register("samples", table)
    best = None
    groups = 0
    for _ in range(3):
        started = time.perf_counter()
        result = con.execute(QUERY).fetch_arrow_table()
        elapsed = time.perf_counter() - started
        groups = result.num_rows
        best = elapsed if best is None else min(best, elapsed)
    print(json.dumps({"rows": table.num_rows, "groups": groups, "seconds": best,
                      "records_per_s": table.num_rows / best}))


if __name__ == "__main__":
    main(sys.argv[1])
