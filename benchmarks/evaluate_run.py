"""An exported model (e.g. a federated run's final model) evaluated exactly on a whole data set:
full-ranking HR/NDCG@10 of every user's held-out last event and the demand forecast, next to the
demand baselines. A federated run's own figures are DP releases (noisy sums from each client);
these are not, so runs can be compared to the third decimal. The users and series are those of
the federated evaluation, whose clients partition the regions.

    python benchmarks/evaluate_run.py RUN_DIR [DATA_FILE FORMAT]   # no data: the synthetic default
"""

import json
import sys

import torch

from common.data.formats import load_events
from common.data.synth import SynthConfig, generate
from common.learning.dataset import prepare
from common.learning.demand import holdout_forecast
from common.learning.forecasting import baseline_scores, score
from common.learning.inference import load_exported
from common.learning.training import evaluate_ranking

run, data = sys.argv[1], sys.argv[2:4]
exp = load_exported(run)
if data:
    loaded = load_events(*data)
    events, chars = loaded.events, loaded.spec.top_category_chars
else:
    events, chars = generate(SynthConfig()), None
p = prepare(
    events, top_category_chars=chars, history_len=exp.model.cfg.history, catalog=exp.catalog
)
cpu = torch.device("cpu")
ranking = evaluate_ranking(exp.model, p.test, cpu)
h = holdout_forecast(exp.model, p, cpu)
out = {"users": ranking["users"], **ranking["full"]}
out["demand"] = {k: score(h.actual, f) for k, f in h.forecasts.items()}
out["coverage"] = h.coverage()
out["baselines"] = baseline_scores(p.demand, p.holdout_weeks)
print(json.dumps(out, indent=1))
