"""Names that cross the client–server boundary in Flower messages, one place for both sides,
and the names of the aggregated metrics the server records per round (`rounds.json`)."""

# Record names of Flower's message strategies (FedAvg's `arrayrecord_key` and friends)
ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"

# Request config, server → client ("server-round" is Flower's own)
SERVER_ROUND = "server-round"
CATALOG_PATH = "catalog"  # the platform catalogue's path (simulation; deployed clients own one)
DEMAND_START = "demand-start"  # first day of the weekly demand bins
DEMAND_END = "demand-end"  # the day after the last one they cover
PROXIMAL_MU = "proximal-mu"  # FedProx's proximal weight
LEDGER_HEADS = "ledger-heads"  # each client's newest ledger entry the server has seen
# Under SecAgg+ the model travels as Flower's unnamed legacy Parameters; the names, in order
ARRAY_NAMES = "array-names"

# Reply records, client → server
CLIENT = "client"  # who replied and the ledger entry of this release
NAME = "name"
LEDGER_SEQ = "ledger-seq"
LEDGER_HASH = "ledger-hash"
LEDGER_ENTRY = "ledger-entry"  # the entry's canonical JSON, so the server can check who signed
LEDGER_SIGNATURE = "ledger-signature"  # base64 Ed25519 signature over LEDGER_ENTRY
REFUSED = "refused"  # the client would not act on the request; holds only the reason
REASON = "reason"
# A client's item-popularity histogram (DP: released once, with its first trained round), as
# one array under the name of the model's popularity buffer, which the server fills with the sum
POPULARITY = "popularity"
ITEM_POPULARITY = "item_popularity"

# Training reply metrics (all inside the client's ε, or derived from what is)
WEIGHT = "num-examples"  # the FedAvg weight: a client's released (noisy) user count
UNIFORM = "uniform-weight"  # every client's update counts the same (client-level DP needs it)
DECLINED = "declined"  # 1 when the round would have passed the client's budget
EPSILON = "epsilon"
DELTA = "delta"
EPSILON_BUDGET = "epsilon-budget"
NOISE_MULTIPLIER = "noise-multiplier"
CLIP_NORM = "clip-norm"
SAMPLE_RATE = "sample-rate"
STEPS = "steps"

# Evaluation reply sums: `*-sum` values add up across clients
SUM = "-sum"
USERS_SUM = "users-sum"
HITS_SUM = "hits10-sum"
NDCG_SUM = "ndcg10-sum"
DEMAND_ACTUAL_SUM = "demand-actual-sum"
DEMAND_ERROR_SUM = "demand-abs-error-sum"  # the model's primary forecast
DEMAND_RAW_ERROR_SUM = "demand-raw-abs-error-sum"  # the model's bottom-up sum, uncorrected
DEMAND_MA_ERROR_SUM = "demand-ma-abs-error-sum"  # 4-week moving average
DEMAND_LEVEL_ERROR_SUM = "demand-level-abs-error-sum"  # the robust level alone
DEMAND_COVERED_SUM = "demand-covered-sum"  # held-out weeks inside the forecast interval
DEMAND_CELLS_SUM = "demand-cells-sum"  # held-out weeks of series that have an interval
RANKING_SUMS = (USERS_SUM, HITS_SUM, NDCG_SUM)  # noised under DP
DEMAND_SUMS = (  # exact; sent only where the client's policy shares them
    DEMAND_ACTUAL_SUM,
    DEMAND_ERROR_SUM,
    DEMAND_RAW_ERROR_SUM,
    DEMAND_MA_ERROR_SUM,
    DEMAND_LEVEL_ERROR_SUM,
    DEMAND_COVERED_SUM,
    DEMAND_CELLS_SUM,
)

# Aggregated metrics the server records per round
HR10 = "hr10"
NDCG10 = "ndcg10"
WAPE = "wape"
WAPE_UNCALIBRATED = "wape-uncalibrated"
WAPE_MOVING_AVERAGE = "wape-moving-average"
