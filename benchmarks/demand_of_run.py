"""Demand forecasts of an exported model (e.g. a federated run's final model) on a whole data set,
next to the demand baselines: the same series as the federated evaluation, whose clients
partition the regions.

    python benchmarks/demand_of_run.py RUN_DIR DATA_FILE FORMAT
"""

import json
import sys

import torch

from common.data.formats import load_events
from common.learning.dataset import prepare
from common.learning.demand import holdout_forecast
from common.learning.forecasting import baseline_scores, score
from common.learning.inference import load_exported

run, data, fmt = sys.argv[1:4]
exp = load_exported(run)
r = load_events(data, fmt)
p = prepare(
    r.events,
    top_category_chars=r.spec.top_category_chars,
    history_len=exp.model.cfg.history,
    catalog=exp.catalog,
)
h = holdout_forecast(exp.model, p, torch.device("cpu"))
out = {k: score(h.actual, f) for k, f in h.forecasts.items()}
out["coverage"] = h.coverage()
out["baselines"] = baseline_scores(p.demand, p.holdout_weeks)
print(json.dumps(out, indent=1))
