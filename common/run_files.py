"""The names of the files a run leaves behind, in one place: the server and the clients write
them; the command line, the compliance report, the audit and inference read them."""

MODEL = "model.safetensors"  # the shared model's weights
CARD = "model_card.json"  # what the model is, how it was trained, its metrics and privacy
CATALOG = "catalog.json"  # the platform's item catalogue the model's vocabulary comes from
CHECKPOINT = "checkpoint.safetensors"  # the server's state after the last finished round
ROUNDS = "rounds.json"  # per round: every client's reply and the aggregated metrics
METRICS_CSV = "metrics.csv"
CLIENTS_CSV = "clients.csv"
PLOTS = "plots"  # folder of PNG plots
RESULTS = "results.json"  # exact results beside the baselines: central, local-only, simulated
FLOWER_LOG = "flower.log"
FLOWER_HOME = ".flwr"  # the run's own Flower home (connection config, local SuperLink state)
CLIENTS = "clients"  # simulated clients' state folders, one per client name
POLICY = "privacy_policy.json"  # simulated clients' privacy policy, in CLIENTS
CLIENT_LEDGER = "privacy_ledger.jsonl"  # beside a client's data (its state folder)
NOISY_COUNT = "noisy_user_count.json"  # beside the ledger until its first trained entry
NOISY_POPULARITY = "noisy_item_popularity.npy"  # beside the ledger, from that entry on
SERVER_LEDGER = "aggregation_ledger.jsonl"
CENTRAL_ACCOUNTANT = "central_accountant.json"  # saved before each aggregate leaves
PRIVACY_REPORT_HTML = "privacy_report.html"
PRIVACY_REPORT_JSON = "privacy_report.json"
AUDIT = "audit.json"
# Model card key: the first day of the weekly demand bins the model was trained and evaluated
# on; `fedshop forecast` and `monitor` bin recent events on the same weekdays.
DEMAND_WEEKS_FROM = "demand_weeks_from"
