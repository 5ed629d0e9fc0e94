"""A client's privacy account: the one door through which a client spends privacy.

It answers the server's request with the client's own policy, holds the ledger's lock while a
round runs, fixes the mechanism at the first training round (from a noisy user count it
releases then), and writes every release to the signed ledger before anything leaves the client.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.atomic import write_json, write_with
from common.run_files import CLIENT_LEDGER, NOISY_COUNT, NOISY_POPULARITY
from common.runconfig import RunConfig
from privacy.accounting import (
    Budget,
    Mechanism,
    PrivacyState,
    RoundSpend,
    Step,
    Unplannable,
    plan_mechanism,
    release_steps,
    restore,
    spend_fields,
)
from privacy.ledger import (
    LedgerError,
    Line,
    Release,
    Spend,
    append,
    check_head,
    locked,
    parse,
    read_signed,
)
from privacy.policy import PrivacyPolicy, Refused
from privacy.randomness import gaussian_release
from privacy.signing import load_or_create

# An evaluation releases (users, hits@10, NDCG@10) summed over users: each user adds at most 1
# to each, so one user added or removed moves the vector by at most √3 in L2.
EVAL_VALUES = 3
EVAL_L2 = math.sqrt(EVAL_VALUES)


def _save(path: Path, histogram: np.ndarray) -> None:
    with open(path, "wb") as fh:
        np.save(fh, histogram)


def _released_popularity(path: Path) -> np.ndarray | None:
    """The histogram the ledger's first trained entry released, if this client kept it."""
    if not path.exists():
        return None
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise LedgerError(f"{path}: not a released popularity histogram ({exc})") from exc


def _check_release_noise(spends: list[Spend], policy: PrivacyPolicy) -> None:
    """`Refused` if the policy's evaluation noise is not the one the ledger released with: one
    kind of release keeps one mechanism (the verifier checks it), and the plan reserved each
    round's evaluation at that noise."""
    for spend in spends:
        for release in spend.releases:
            if release.what == "evaluation" and release.noise_multiplier != policy.evaluation_noise:
                raise Refused(
                    f"this client's policy sets evaluation noise {policy.evaluation_noise:g}; "
                    f"its ledger (entry {spend.seq}) fixed {release.noise_multiplier:g}"
                )


def mechanism_shape(noisy_users: int, request: RunConfig) -> tuple[float, int]:
    """(sample rate, steps per round) for a request, from the released count alone.

    q = 1/k exactly, k steps per epoch: Opacus accounts 1/len(loader), and a loader of k
    steps makes that the same float as q (1/int(1/q) is not, for 70 of k = 2…1000).
    """
    per_epoch = max(1, round(noisy_users / request.batch_size))
    return 1 / per_epoch, per_epoch * request.local_epochs


@dataclass
class PrivacyAccount:
    client: str
    ledger: Path
    key_path: Path
    policy: PrivacyPolicy
    request: RunConfig
    state: PrivacyState
    cap: float
    run_id: str
    pending: list[Release]
    # The noisy item-popularity histogram released with the first trained round; every
    # trained reply carries it again (kept beside the ledger), so a lost first reply does not
    # lose it: the server counts each client's once, and resending a release costs nothing.
    popularity: np.ndarray | None = None

    @classmethod
    @contextmanager
    def open(
        cls,
        client: str,
        state_dir: Path,
        key_path: Path,
        policy: PrivacyPolicy,
        request: RunConfig,
        head: tuple[int, str] | None,
        run_id: int | str,
    ) -> Iterator[PrivacyAccount]:
        """The account, locked for the block; `Refused` if the request asks for more than
        the client allows, `LedgerError` if the ledger lacks what the server saw (`head`)."""
        path = state_dir / CLIENT_LEDGER
        with locked(path):
            public = load_or_create(key_path).public_key() if path.exists() else None
            lines = read_signed(path, public) if public else []
            check_head(path, lines, head)
            spends = [parse(path, line, Spend) for line in lines]
            fixed = Budget.of_entry(spends[0]) if spends else None
            budget, cap = policy.answer(request, fixed)
            _check_release_noise(spends, policy)
            try:
                state = restore(client, budget, spends)
            except ValueError as exc:
                raise LedgerError(f"{path}: {exc}") from exc
            released = _released_popularity(path.with_name(NOISY_POPULARITY))
            yield cls(
                client, path, key_path, policy, request, state, cap, str(run_id), [], released
            )

    def mechanism(self, users: int, popularity: Callable[[], np.ndarray]) -> Mechanism:
        """The DP-SGD mechanism: the ledger's, or planned now around the noisy count of
        `users` (`_noisy_count`) and with the noisy `popularity()` histogram (each user's
        part of L2 norm ≤ 1; both released with the first training entry). `Refused` if this
        request's batch size or schedule would change the one the ledger fixed, or breaks the
        policy's limits.
        More rounds than planned change nothing: the fixed mechanism runs until the budget
        declines them."""
        if self.state.mechanism is None:
            self.state.mechanism = self._plan(users, popularity)
        mech = self.state.mechanism
        q, steps = mechanism_shape(mech.noisy_users, self.request)
        asked = (q, steps, self.request.clip_norm)
        fixed = (mech.sample_rate, mech.steps_per_round, mech.clip_norm)
        if asked != fixed:
            raise Refused(
                "the request (batch size, local epochs, clip norm) would change the mechanism "
                f"this client's ledger fixed (sample rate, steps per round, clip norm {fixed}; "
                f"asked {asked})"
            )
        return mech

    def _plan(self, users: int, popularity: Callable[[], np.ndarray]) -> Mechanism:
        count = Release(what="user-count", noise_multiplier=self.policy.count_noise, sensitivity=1)
        items = Release(
            what="item-popularity", noise_multiplier=self.policy.popularity_noise, sensitivity=1
        )
        noisy = self._noisy_count(users)
        if self.state.budget.delta >= 1 / noisy:
            raise Refused(  # no count in the message: this one was never released
                f"δ = {self.state.budget.delta:g} is not below 1/users: the guarantee would "
                "allow revealing a user"
            )
        q, steps = mechanism_shape(noisy, self.request)
        try:
            mech = plan_mechanism(
                self.state.budget,
                q,
                steps,
                self.request.budget_rounds,
                self.request.clip_norm,
                self.policy.accountant.value,
                noisy_users=noisy,
                spent=[*self.state.history, *release_steps([count, items])],
                per_round=release_steps([self._evaluation_release()]),
            )
        except Unplannable as exc:
            raise Refused(str(exc)) from exc
        if (
            q > self.policy.max_sample_rate
            or mech.noise_multiplier < self.policy.min_noise_multiplier
        ):
            raise Refused(  # the plan's figures stay here: they derive from the count
                f"the plan breaks this client's limits (sample rate ≤ "
                f"{self.policy.max_sample_rate:g}, noise multiplier ≥ "
                f"{self.policy.min_noise_multiplier:g})"
            )
        self.pending = [count, items]
        self.popularity = gaussian_release(popularity(), self.policy.popularity_noise)
        return mech

    def _noisy_count(self, users: int) -> int:
        """The noisy user count, drawn once and kept beside the ledger until the first trained
        entry records its release: every refusal before then is a function of that one
        release, never of fresh draws that a server asking again and again could average."""
        path = self.ledger.with_name(NOISY_COUNT)
        if path.exists():
            try:
                return int(json.loads(path.read_text())["noisy_users"])
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise LedgerError(f"{path}: not a kept noisy user count ({exc})") from exc
        noisy = max(1, round(float(gaussian_release(np.array(users), self.policy.count_noise))))
        write_json(path, {"noisy_users": noisy})
        return noisy

    def _evaluation_release(self) -> Release:
        return Release(
            what="evaluation", noise_multiplier=self.policy.evaluation_noise, sensitivity=EVAL_L2
        )

    def can_train(self) -> bool:
        extra = [*release_steps(self.pending), *self.state.round_steps()]
        return self.state.affordable(extra, self.cap)[0]

    def decline(self, server_round: int) -> Line:
        """Record a round declined for want of budget (it releases nothing, costs nothing).

        A mechanism planned in this very round is not fixed by a declined entry: its noisy
        count would then be in the ledger without its release being accounted."""
        if self.pending:
            raise Refused("the first round does not fit the ε this request allows")
        return self._write(self.state.record(server_round, [], "declined"))

    def trained(self, server_round: int, history: list[Step]) -> Line:
        """Record a finished round from what Opacus' accountant saw; only then may its update
        (and the user count, at the first round) leave. Raises if the mechanism that ran is not
        the fixed one or the budget no longer holds: then nothing is written or sent."""
        mech = self.state.mechanism
        assert mech is not None
        merged = {(sigma, q) for sigma, q, _ in history}
        steps = sum(s for _, _, s in history)
        if merged != {(mech.noise_multiplier, mech.sample_rate)} or steps != mech.steps_per_round:
            raise RuntimeError(
                f"Opacus ran {history}, not the fixed mechanism (σ {mech.noise_multiplier}, "
                f"q {mech.sample_rate}, {mech.steps_per_round} steps); nothing is sent"
            )
        sgd = [(mech.noise_multiplier, mech.sample_rate, steps)]
        ok, after = self.state.affordable([*sgd, *release_steps(self.pending)], self.cap)
        if not ok:
            raise RuntimeError(f"the round would reach ε = {after:.4f}, past the limit; withheld")
        first = bool(self.pending)  # the entry that releases the count and the histogram
        line = self._write(self.state.record(server_round, sgd, "trained", self.pending))
        if first:
            self.ledger.with_name(NOISY_COUNT).unlink(missing_ok=True)  # the ledger holds it
            histogram = self.popularity
            write_with(self.ledger.with_name(NOISY_POPULARITY), lambda p: _save(p, histogram))
        return line

    def evaluation(self, server_round: int, sums: np.ndarray) -> tuple[np.ndarray, Line]:
        """`sums` (per-user contributions each in [0, 1]) released with Gaussian noise, and the
        ledger entry recording it; `Refused` before the first training round or past the
        budget."""
        if self.state.mechanism is None:
            raise Refused("this client has not trained yet: no mechanism, no evaluation")
        release = self._evaluation_release()
        if len(sums) != EVAL_VALUES:
            raise ValueError(f"an evaluation releases {EVAL_VALUES} sums, got {len(sums)}")
        if not self.state.affordable(release_steps([release]), self.cap)[0]:
            raise Refused("an evaluation would pass this client's privacy budget")
        noisy = gaussian_release(sums, release.noise_multiplier * release.sensitivity)
        line = self._write(self.state.record(server_round, [], "evaluated", [release]))
        return noisy, line

    def _write(self, spend: RoundSpend) -> Line:
        fields = spend_fields(self.state, spend, self.run_id)
        return append(self.ledger, fields, load_or_create(self.key_path), Spend)
