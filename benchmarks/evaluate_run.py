"""An exported model (e.g. a federated run's final model) evaluated exactly on a whole data set:
full-ranking HR/NDCG@10 of every user's held-out last event, for the model alone and for what
each client serves (the model beside its own rule), next to the rules (counted on each client's
own events, and on every region's at once); and the demand forecast next to the demand
baselines. A federated run's own ranking figures are DP releases (noisy sums from each client);
these are not, so runs can be compared to the third decimal. The users, series and clients are
those of the federated run: each client's demand forecast is calibrated on its own series, and
the errors are pooled, as its clients' are.

    python benchmarks/evaluate_run.py RUN_DIR [DATA_FILE FORMAT]   # no data: the synthetic default
"""

import json
import sys
from pathlib import Path

from common.data.formats import load_events
from common.data.partition import plan
from common.data.synth import SynthConfig, generate
from common.learning.demand import PRIMARY
from common.run_files import CARD
from simulations.central import evaluate_exported

run, data = Path(sys.argv[1]), sys.argv[2:4]
if data:
    loaded = load_events(*data)
    events, chars = loaded.events, loaded.spec.top_category_chars
else:
    events, chars = generate(SynthConfig()), None
card = json.loads((run / CARD).read_text())
parts = plan(events, len(card["privacy"]["clients"]))
calendar = [card["run_config"].get(k) or "" for k in ("demand-start", "demand-end")]
exact = evaluate_exported(run, events, chars, parts, *calendar)
ranking, forecast = exact["bert"]["test"], exact["bert"]["forecast"]
out = {"users": ranking["users"], **ranking["full"], "served": exact["bert"]["served"]["full"]}
out["served_choices"] = exact["bert"]["clients"]
rules = exact["baselines"]
out["rules_own_region"] = {k: m["full"] for k, m in rules["recommendation_own_region"].items()}
out["rules_every_region"] = {k: m["full"] for k, m in rules["recommendation"].items()}
out["demand"] = {k: {"wape": f["wape"], "mae": f["mae"]} for k, f in forecast.items()}
out["coverage"] = forecast[PRIMARY]["coverage"]
out["baselines"] = exact["baselines"]["forecast"]
print(json.dumps(out, indent=1))
