"""What a training reply must look like before it may reach the aggregate.

A reply from a broken or hostile client is rejected, with its client's name in the reason, when:

- its records are not the ones our ClientApp sends (one ArrayRecord `arrays`, one MetricRecord
  `metrics` with exactly the metric names a DP or a plain round releases): Flower's strategies
  abort the whole round on replies whose records or keys differ, so one such reply would stop
  every honest client's round too;
- a weight or metric it is aggregated by is not a positive finite number (`num-examples`), or
  not 1 (`uniform-weight`, client-level DP's equal weights);
- its arrays are not the arrays the server sent (names missing or extra, another dtype or
  shape), are unreadable, or hold NaN or ±Inf;
- its DP mechanism is not the one the request fixed (clip norm), or its sample rate and steps do
  not follow from its own released user count the way every client derives them
  (`privacy.account.mechanism_shape`);
- its update (reply arrays − the arrays the server sent) moves some coordinate further than the
  client's local training can move it (`adam_displacement`, below);
- its item-popularity histogram (sent with a client's first round) is not one finite array of
  the catalogue's items. Its values are noisy and cannot be bounded further: the server keeps
  the sum, and a client can skew the popularity prior as it can skew an update.

Under SecAgg+ (`RunConfig.secagg`) none of this can run: the server only ever sees the masked
sum, never one client's arrays. That is why the run config refuses the robust strategies with
secagg; the round loop skips these checks there.

**Why the size bound is sound.** Clients train with `torch.optim.Adam` at the run config's `lr`
(the model's few priors, `common.learning.configs.FAST_PARAMETERS`, at `FAST_LR` times it; their
arrays get the bound of their own lr) and Adam's default β₁ = 0.9, β₂ = 0.999, no weight decay,
a fresh optimizer every round (`clients/local_training.py`), under DP-SGD (Opacus wraps the
same Adam) or without it. Torch's Adam moves a coordinate at step t by

    lr · m̂_t / (√v̂_t + ε),  m̂_t = m_t / (1 − β₁ᵗ),  v̂_t = v_t / (1 − β₂ᵗ),
    m_t = (1 − β₁) Σᵢ β₁^(t−i) gᵢ,  v_t = (1 − β₂) Σᵢ β₂^(t−i) gᵢ².

Writing β₁^(t−i) gᵢ = (β₁/√β₂)^(t−i) · √β₂^(t−i) gᵢ, Cauchy–Schwarz gives
|Σᵢ β₁^(t−i) gᵢ| ≤ √(Σₖ₌₀^(t−1) rᵏ) · √(v_t / (1 − β₂)) with r = β₁²/β₂ < 1, so, whatever the
gradients (clipped or not, noised or not, ε only shrinks the step):

    |step t| ≤ lr · ρ(t),  ρ(t) = (1 − β₁)/(1 − β₁ᵗ) · √((1 − β₂ᵗ)/(1 − β₂)) · √((1 − rᵗ)/(1 − r)).

ρ(1) = 1 (Adam's first step is lr · sign(g)), ρ(t) stays close to 1 for the first tens of
steps and never exceeds its limit ρ∞ = (1 − β₁)/√((1 − β₂)(1 − r)) ≈ 7.27 (reached only by
gradients that grow geometrically every step). "|Δ| ≤ lr per step" is the usual rule of thumb;
it is not a bound after bias correction wears off (a coordinate whose gradient appears after
many zero steps moves up to ≈ 3.2 lr), so we use ρ(t). A round of T optimizer steps therefore
moves each coordinate by at most lr · Σₜ₌₁ᵀ ρ(t). FedProx's pull toward the sent weights after
each step, p ← p − lr·μ·(p − p₀), multiplies |p − p₀| by |1 − lr·μ| (≤ 1 unless lr·μ > 2, which
`adam_displacement` also covers). T is not taken from the reply on trust: it is the step count
the mechanism has to have given the reply's released user count (DP), or one epoch of
ceil(users / batch-size) batches per local epoch (no DP), and a reply claiming more steps is
rejected. A client can still inflate its released user count (and so its FedAvg weight and its
step allowance); that count is DP-noised and cannot be checked, which is one reason to choose a
robust strategy that ignores weights. The bound is then widened by `SLACK` (50 %) and float32
rounding (one unit in the last place of the largest sent value per step). Honest updates do
reach the unwidened bound in some coordinate (Adam's first steps move a coordinate whose
gradient keeps its sign by almost exactly lr each; `benchmarks/poisoning.py` measures 67 % of
the widened bound), so an update scaled by more than about 1.5 is caught, and a smaller scaling
or a sign flip is not: those are left to the robust strategies.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message

from common.learning.configs import lr_scale
from common.messages import (
    ARRAYS,
    CLIENT,
    CLIP_NORM,
    DECLINED,
    DELTA,
    DEMAND_SUMS,
    EPSILON,
    EPSILON_BUDGET,
    ITEM_POPULARITY,
    LEDGER_ENTRY,
    LEDGER_HASH,
    LEDGER_SEQ,
    METRICS,
    NAME,
    NOISE_MULTIPLIER,
    POPULARITY,
    RANKING_SUMS,
    SAMPLE_RATE,
    STEPS,
    UNIFORM,
    WEIGHT,
)
from common.runconfig import RunConfig, StrategyName
from privacy.account import mechanism_shape

# torch.optim.Adam's defaults, which clients/local_training.py uses (tests check both).
BETA1, BETA2 = 0.9, 0.999
SLACK = 1.5  # the bound is exact arithmetic; this only keeps honest replies far from it
EXACT_STEPS = 10_000  # ρ(t) summed exactly up to here, bounded by ρ∞ beyond
# No shop counts this many users, units or steps. A larger finite value could only overflow
# the sums it joins (the popularity histogram is summed in float32) into Inf, then NaN.
LARGEST = 1e15

# What a trained reply's MetricRecord holds: without DP and with it (clients/rounds.py).
PLAIN_METRICS = frozenset({DECLINED, UNIFORM, WEIGHT, EPSILON})
DP_METRICS = PLAIN_METRICS | {
    DELTA,
    EPSILON_BUDGET,
    NOISE_MULTIPLIER,
    CLIP_NORM,
    SAMPLE_RATE,
    STEPS,
}
# What an evaluation reply's MetricRecord holds: ranking sums, and demand sums or none.
EVALUATION_METRICS = frozenset({WEIGHT, UNIFORM, *RANKING_SUMS})


def _rho(t: np.ndarray, beta1: float, beta2: float) -> np.ndarray:
    r = beta1**2 / beta2
    return (
        (1 - beta1)
        / (1 - beta1**t)
        * np.sqrt((1 - beta2**t) / (1 - beta2))
        * np.sqrt((1 - r**t) / (1 - r))
    )


def rho_limit(beta1: float = BETA1, beta2: float = BETA2) -> float:
    """ρ∞: the most one late Adam step can move a coordinate, in units of lr."""
    return (1 - beta1) / math.sqrt((1 - beta2) * (1 - beta1**2 / beta2))


def adam_displacement(
    steps: int, lr: float, pull: float = 0.0, beta1: float = BETA1, beta2: float = BETA2
) -> float:
    """The farthest `steps` steps of a fresh torch Adam at `lr` can move any coordinate (with
    FedProx's pull of lr·`pull` toward the start after each step); see the module docstring."""
    if steps <= 0:
        return 0.0
    exact = _rho(np.arange(1, min(steps, EXACT_STEPS) + 1, dtype=np.float64), beta1, beta2)
    late = max(0, steps - EXACT_STEPS)
    shrink = abs(1 - lr * pull)
    if shrink <= 1:  # the pull never moves a coordinate away from where it started
        return lr * (float(exact.sum()) + late * rho_limit(beta1, beta2))
    # lr·μ > 2: each pull overshoots and scales |Δ| by `shrink` > 1; with every ρ ≤ ρ∞ the
    # recursion B ← shrink·(B + lr·ρ∞) sums to the geometric series below (inf if it overflows)
    try:
        growth = (shrink**steps - 1) / (shrink - 1)
    except OverflowError:
        return math.inf
    return lr * rho_limit(beta1, beta2) * shrink * growth


def client_name(m: Message) -> str:
    """Who a reply says it is (its node if it names nobody), for reasons and logs."""
    node = m.metadata.src_node_id
    try:
        return f"{str(m.content[CLIENT][NAME])!r} (node {node})"
    except (KeyError, TypeError):
        return f"node {node} (no client name)"


def _number(metrics, key: str) -> float | None:
    try:
        value = float(metrics[key])
    except (KeyError, TypeError, ValueError):
        return None
    return value if math.isfinite(value) and abs(value) <= LARGEST else None


def _not_a_number(metrics, key: str) -> str | None:
    if _number(metrics, key) is None:
        return f"metric {key!r} is {metrics[key]!r}, not a finite number within ±{LARGEST:g}"
    return None


def _unreadable(m: Message, plain_epsilon: bool) -> str | None:
    """Why the metrics or the client record of a training reply, declined or not, cannot be
    recorded: every metric a finite number within LARGEST (a non-private client's ε is
    infinite), the ledger entry it cites a whole number and a hash."""
    metrics = m.content[METRICS]
    for key in sorted(metrics):
        infinite = plain_epsilon and key == EPSILON and metrics[key] == math.inf
        why = None if infinite else _not_a_number(metrics, key)
        if why:
            return why
    return _unreadable_entry(m)


def _unreadable_entry(m: Message) -> str | None:
    """Why the ledger entry a reply cites cannot be recorded: not a whole number and a hash."""
    client = m.content.config_records.get(CLIENT, {})
    seq, digest = client.get(LEDGER_SEQ, -1), client.get(LEDGER_HASH, "")
    if type(seq) is not int or seq < -1 or not isinstance(digest, str):
        return f"ledger entry {seq!r} ({digest!r}) is not an entry number and a hash"
    return None


@dataclass(frozen=True)
class Citation:
    """What the ledger entry a reply cites must be: its own signed body (hash and seq), of the
    kind the reply's step writes, of this round and run. The server's heads and its record
    keep what a reply cites, so a reply citing another entry would move them off the spend it
    stands for (the verifier would later blame the server's record)."""

    step: str  # "train" or "evaluate"
    server_round: int
    run_id: str

    def problem(self, m: Message) -> str | None:
        client = m.content.config_records.get(CLIENT, {})
        seq = client.get(LEDGER_SEQ, -1)
        if LEDGER_ENTRY not in client:
            if seq == -1 and LEDGER_HASH not in client:
                return None  # cites nothing: a client without DP (the verifier names it)
            return f"{client_name(m)}: cites ledger entry {seq!r} without the entry itself"
        entry = str(client[LEDGER_ENTRY])
        if hashlib.sha256(entry.encode()).hexdigest() != client.get(LEDGER_HASH):
            return f"{client_name(m)}: the cited ledger entry does not match its hash"
        try:
            body = json.loads(entry)
        except ValueError:
            return f"{client_name(m)}: the cited ledger entry is not JSON"
        expected = {
            "status": self._status(m),
            "seq": seq,
            "server_round": self.server_round,
            "run_id": self.run_id,
        }
        for key, value in expected.items():
            if not isinstance(body, dict) or body.get(key) != value:
                found = body.get(key) if isinstance(body, dict) else body
                return f"{client_name(m)}: cites a ledger entry with {key} {found!r}, not {value!r}"
        return None

    def _status(self, m: Message) -> str:
        if self.step == "evaluate":
            return "evaluated"
        metrics = m.content.metric_records.get(METRICS, {})
        return "declined" if _number(metrics, DECLINED) else "trained"


@dataclass(frozen=True)
class ReplyChecks:
    """What the server knows about every client's round: the run config it sent."""

    cfg: RunConfig

    @property
    def proximal_mu(self) -> float:
        return self.cfg.proximal_mu if self.cfg.strategy is StrategyName.FEDPROX else 0.0

    def rejection(self, m: Message, sent: ArrayRecord, secure: bool = False) -> str | None:
        """Why the training reply `m` (to a request that carried `sent`) must not be
        aggregated, naming its client; None when it may. A declined reply holds no update and
        passes once its metrics are readable. Under SecAgg+ (`secure`) the server never holds
        one client's arrays, so only its metrics and popularity histogram are checked."""
        why = self._problem(m, sent, secure)
        return f"{client_name(m)}: {why}" if why else None

    def evaluation_rejection(self, m: Message) -> str | None:
        """Why the evaluation reply `m` must not join the round's metrics, naming its client;
        None when it may. Ranking sums are noised under DP (they may be negative), so only
        finiteness is checked there; demand sums are exact and cannot be negative."""
        why = self._evaluation_problem(m)
        return f"{client_name(m)}: evaluation {why}" if why else None

    def _evaluation_problem(self, m: Message) -> str | None:
        metric_records = list(m.content.metric_records)
        if metric_records != [METRICS] or m.content.array_records:
            return f"expected only a MetricRecord {METRICS!r}, got {list(m.content.keys())}"
        metrics = m.content[METRICS]
        keys = set(metrics)
        if keys not in (EVALUATION_METRICS, EVALUATION_METRICS | set(DEMAND_SUMS)):
            extra = sorted(keys - EVALUATION_METRICS - set(DEMAND_SUMS))
            return f"metrics {sorted(keys)} are not the ranking sums with all or no demand sums" + (
                f" (unexpected {extra})" if extra else ""
            )
        for key in sorted(keys):
            why = _not_a_number(metrics, key)
            if why:
                return why
            if key in DEMAND_SUMS and float(metrics[key]) < 0:
                return (
                    f"metric {key!r} is {metrics[key]:g}: an exact sum of absolute values or counts"
                )
        if _number(metrics, UNIFORM) != 1.0 or _number(metrics, WEIGHT) < 1.0:
            return f"{UNIFORM!r} must be 1 and {WEIGHT!r} at least 1"
        return _unreadable_entry(m)

    def _problem(self, m: Message, sent: ArrayRecord, secure: bool) -> str | None:
        content = m.content
        metric_records = list(content.metric_records)
        if metric_records != [METRICS]:
            return f"expected one MetricRecord {METRICS!r}, got {metric_records}"
        metrics = content[METRICS]
        unreadable = _unreadable(m, not self.cfg.dp)
        if unreadable:
            return unreadable
        declined = _number(metrics, DECLINED)
        if declined not in (0.0, 1.0):
            return f"metric {DECLINED!r} is {metrics.get(DECLINED)!r}, not 0 or 1"
        if declined:
            return None
        expected = DP_METRICS if self.cfg.dp else PLAIN_METRICS
        missing, extra = sorted(expected - set(metrics)), sorted(set(metrics) - expected)
        if missing or extra:
            return f"metrics missing {missing}, unexpected {extra}"
        weight = _number(metrics, WEIGHT)
        if weight is None or weight <= 0:
            return f"weight {WEIGHT!r} is {metrics[WEIGHT]!r}, not a positive finite number"
        if _number(metrics, UNIFORM) != 1.0:
            return f"{UNIFORM!r} is {metrics[UNIFORM]!r}, not 1"
        steps = self.steps(metrics)
        if isinstance(steps, str):
            return steps
        if POPULARITY in content.config_records and ITEM_POPULARITY in sent:
            why = _popularity(content[POPULARITY], sent[ITEM_POPULARITY])
            if why:
                return why
        if secure and weight > self.cfg.secagg_max_weight:
            # SecAgg+ scales the parameters by weight / max-weight before clipping them to its
            # range: this client's share of the sum was clipped, silently.
            return (
                f"weight {weight:g} is above secagg-max-weight {self.cfg.secagg_max_weight:g}, "
                "so SecAgg+ clipped its update; raise secagg-max-weight"
            )
        if secure:
            return None
        array_records = list(content.array_records)
        if array_records != [ARRAYS]:
            return f"expected one ArrayRecord {ARRAYS!r}, got {array_records}"
        return self._arrays(content[ARRAYS], sent, steps)

    def steps(self, metrics) -> int | str:
        """Optimizer steps the round behind a trained reply's `metrics` can have taken (a
        positive weight assumed), or why the metrics are inconsistent. Without DP: one
        DataLoader pass of ceil(users / batch-size) batches per local epoch. With DP: the
        steps the mechanism fixed by its released user count has (Poisson batches that come
        out empty take no optimizer step, so this is an upper bound)."""
        weight = float(metrics[WEIGHT])
        if not self.cfg.dp:
            return self.cfg.local_epochs * math.ceil(weight / self.cfg.batch_size)
        values = {k: _number(metrics, k) for k in (NOISE_MULTIPLIER, CLIP_NORM, SAMPLE_RATE, STEPS)}
        bad = [k for k, v in values.items() if v is None or v <= 0]
        if bad:
            return f"DP metrics {bad} are not positive finite numbers"
        if not math.isclose(values[CLIP_NORM], self.cfg.clip_norm, rel_tol=1e-9):
            return f"clip norm {values[CLIP_NORM]:g}, the request fixed {self.cfg.clip_norm:g}"
        if weight != int(weight):
            return f"weight {weight:g} is not the whole user count a DP client releases"
        q, steps = mechanism_shape(int(weight), self.cfg)
        if not math.isclose(values[SAMPLE_RATE], q, rel_tol=1e-9) or values[STEPS] != steps:
            return (
                f"sample rate {values[SAMPLE_RATE]:g} and {values[STEPS]:g} steps do not follow "
                f"from its released user count {weight:g} (sample rate {q:g}, {steps} steps)"
            )
        return steps

    def bound(self, steps: int, key: str) -> float:
        """Largest |Δ| per coordinate of array `key` a round of `steps` steps may show, before
        rounding slack. The model's priors train at a multiple of the lr (`lr_scale`); the
        FedProx pull stays at the base lr · μ for every parameter."""
        scale = lr_scale(key)
        return SLACK * adam_displacement(steps, self.cfg.lr * scale, self.proximal_mu / scale)

    def _arrays(self, reply: ArrayRecord, sent: ArrayRecord, steps: int) -> str | None:
        missing = [k for k in sent if k not in reply]
        extra = [k for k in reply if k not in sent]
        if missing or extra:
            return f"arrays missing {missing[:3]}, unexpected {extra[:3]} (of {len(sent)} sent)"
        worst: tuple[float, str] = (0.0, "")  # (moved / its own bound, why) of the worst array
        for key, array in reply.items():
            expected = sent[key]
            if array.dtype != expected.dtype or tuple(array.shape) != tuple(expected.shape):
                return (
                    f"array {key!r} is {array.dtype}{list(array.shape)}, "
                    f"the model's is {expected.dtype}{list(expected.shape)}"
                )
            try:
                value = array.numpy()
            except Exception as exc:  # any decoding failure is the reply's fault
                return f"array {key!r} cannot be read ({exc})"
            if value.shape != tuple(expected.shape):
                return f"array {key!r} decodes to shape {list(value.shape)}"
            if not np.isfinite(value).all():
                return f"array {key!r} holds NaN or Inf"
            start = expected.numpy().astype(np.float64)
            rounding = steps * float(np.spacing(np.float32(max(1.0, np.abs(start).max(initial=0)))))
            moved = float(np.abs(value.astype(np.float64) - start).max(initial=0))
            limit = self.bound(steps, key)
            past = moved / limit if limit else math.inf
            if moved > limit + rounding and past > worst[0]:
                worst = (
                    past,
                    f"{key!r} moved {moved:.3g} in one coordinate; {steps} Adam steps at lr "
                    f"{self.cfg.lr * lr_scale(key):g} move none by more than {limit:.3g} "
                    f"(bound incl. {SLACK:g}× slack)",
                )
        if worst[1]:
            return f"update too large: {worst[1]}"
        return None


def _popularity(reply: ConfigRecord, sent: Array) -> str | None:
    """Why a popularity histogram cannot join the sum: not one finite value per catalogue
    item. Its values are noisy counts, negative ones included."""
    if list(reply) != [ITEM_POPULARITY]:
        return f"popularity record holds {list(reply)[:3]}, not one list {ITEM_POPULARITY!r}"
    try:
        value = np.asarray(reply[ITEM_POPULARITY], dtype=np.float64)
    except (TypeError, ValueError) as exc:
        return f"popularity is not a list of numbers ({exc})"
    if value.shape != tuple(sent.shape):
        return f"popularity holds {list(value.shape)} values, the catalogue {list(sent.shape)}"
    if not (np.abs(value) <= LARGEST).all():
        return f"popularity holds NaN, Inf or values past {LARGEST:g}"
    return None


def rejections(
    replies: Iterable[Message], sent: ArrayRecord, checks: ReplyChecks
) -> list[tuple[Message, str]]:
    """Each reply that may not be aggregated, with why (its client named)."""
    return [(m, why) for m in replies if (why := checks.rejection(m, sent))]
