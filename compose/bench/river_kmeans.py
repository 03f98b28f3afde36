"""River's side of `ebb bench models`: one river.cluster.KMeans per service, warmed on the
same feature vectors ebb's detector computed, then one timed round of predict_one +
learn_one per service (one window each). Input on stdin: SERVICES x WINDOWS lines of
comma-separated features, service by service. Prints one JSON line."""
import json
import sys
import time

from river import cluster

services, windows = int(sys.argv[1]), int(sys.argv[2])
rows = [list(map(float, line.split(","))) for line in sys.stdin if line.strip()]
if len(rows) != services * windows:
    sys.exit(f"expected {services * windows} rows, got {len(rows)}")
dims = len(rows[0])
as_dict = [{i: v for i, v in enumerate(r)} for r in rows]
models = []
for s in range(services):
    m = cluster.KMeans(n_clusters=8, halflife=0.5, sigma=3, seed=42)
    for w in range(windows - 1):
        m.learn_one(as_dict[s * windows + w])
    models.append(m)
last = [as_dict[s * windows + windows - 1] for s in range(services)]
t0 = time.perf_counter()
for m, x in zip(models, last):
    m.predict_one(x)
    m.learn_one(x)
elapsed = time.perf_counter() - t0
print(json.dumps({"services": services, "dims": dims, "round_s": elapsed,
                  "updates_per_s": services / elapsed}))
