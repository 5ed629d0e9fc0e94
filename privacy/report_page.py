"""The compliance report's page: one self-contained HTML file, plots inline as SVG.

It renders the report's facts (`privacy.report.build`, the same dict the JSON twin holds) and
nothing else, so the page never says more than the verified ledgers do.
"""

from __future__ import annotations

import html
import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from common.run_files import AUDIT
from privacy.audit import COLUMNS
from privacy.randomness import RANDOMNESS

GUARANTEE = """\
Everything a client sent is <b>user-level (ε, δ)-DP for that client's users</b> (neighbouring
data sets: one user added or removed), composed by one accountant over every release, round and
restart: the model updates (DP-SGD with Opacus: Poisson sampling of users, per-user gradient
clipping, Gaussian noise), the user count it released once with Gaussian noise (it sets the
sample rate and is the FedAvg weight), its item-popularity histogram released once with
Gaussian noise (each user's items weigh at most 1 in L2 norm) and, per evaluation, its
(users, hits@10, NDCG@10) sums with Gaussian noise. Whatever these reveal would have been
about as likely (within a factor e<sup>ε</sup>, plus probability δ) had any one of the client's
users never been in its data.
The client's own policy sets the budget, δ and whether DP is required; its ledger's first entry
fixes them. A server asking for more, or for no DP, is refused and receives nothing; a round or
an evaluation that would pass the budget is declined.
"""
THREATS = [
    "The server is honest-but-curious: it follows the protocol and reads everything it "
    "receives, and it may ask for anything. What a client releases is decided by the client's "
    "policy and ledger, never by the request, so the guarantee holds against whoever runs it.",
    "Readers of the model (anyone it is shared with) are curious: they see the final model, "
    "which is post-processing of the clients' DP releases.",
    "A client may be malicious: it can send any update and hurt the shared model, but it "
    "learns no more about other clients' users than the shared model, which is DP for them.",
]
ASSUMPTIONS = [
    "Deployment cannot see whether one person shops at two clients (two regions or merchants): "
    "such a person is protected by each client separately and those ε's add up; within one "
    "client, several accounts of one person are several users. (Only the simulation's "
    "partitioning puts each user in exactly one client.)",
    RANDOMNESS,
    "The client's code ran as published, and hyper-parameters were chosen without looking at "
    "the private data; tuning on it spends privacy that is not in this ledger.",
    "Not covered by ε: demand error sums (the model's, the robust level's and the moving "
    "average's absolute errors, actual units, and how many held-out weeks fell inside the "
    "forecast interval), sent without noise only by clients whose policy shares them "
    "(simulations do); one user's purchases move them by up to that user's units.",
    "Not covered by ε: clients whose policy allows running without DP send exact updates and "
    "counts, and keep no ledger; they appear with ε = ∞.",
    "Not covered by ε: when a client answers, declines or refuses is visible to the server "
    "(and, without a node registry, through the ledger heads to nodes that have not yet "
    "answered under a name); "
    "declining depends only on the ledger, never on the data. The ledger entry each training "
    "and evaluation reply cites goes to the server with it (so it can check who signed): it "
    "holds the policy, the mechanism and the released noisy count, which the sample rate "
    "also reveals, and nothing else about the data. A "
    "first-round refusal because δ is not below 1/users, the plan breaks the policy's limits "
    "or no plan fits the budget is one bit about the noisy user count before it is released "
    "(drawn once and kept until then, however often the server asks); a 'cannot take part' "
    "refusal (no user with 3 or more events, or every user held out for the audit at the "
    "share the run config's audit-holdout names) is one bit about the client's data.",
    "The catalogue and the demand-bin calendar are platform data, public to all clients.",
]
AUDIT_CAVEAT = (
    "A membership-inference audit is evidence, not a proof: an attack failing shows only that "
    "this attack failed, and LiRA's few short-trained reference models make it weaker than the "
    "attacks in the literature. A TPR at a false-positive rate f means little with fewer than "
    "1/f non-members. The guarantee is the ε above, from the clients' own ledgers."
)


def _svg(fig: Figure) -> str:
    for ax in fig.axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    buf = io.StringIO()
    fig.savefig(buf, format="svg")
    plt.close(fig)
    text = buf.getvalue()
    return text[text.index("<svg") :]


# Client names come from the ledgers: a '$' in one is a dollar sign, not matplotlib's math.
_LITERAL_TEXT = {"text.parse_math": False}


@matplotlib.rc_context(_LITERAL_TEXT)
def _client_plot(c: dict) -> str:
    rounds = [x["round"] for x in c["rounds"]]
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.plot(rounds, [x["epsilon_after"] for x in c["rounds"]], marker="o", label="reported")
    for name in ("prv", "pld"):
        values = [x["recomputed"].get(name) for x in c["rounds"]]
        if all(v is not None for v in values):
            ax.plot(rounds, values, linestyle=":", marker=".", label=f"{name.upper()} (tight)")
    for i, rnd in enumerate(c["declined_rounds"]):
        ax.axvline(rnd, color="grey", alpha=0.3, label="declined" if i == 0 else None)
    ax.axhline(c["budget"]["epsilon"], color="red", linestyle="--", label="budget")
    ax.set(xlabel="round", ylabel="cumulative ε", title=f"{c['client']}: user-level ε")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize="small")
    return _svg(fig)


@matplotlib.rc_context(_LITERAL_TEXT)
def _overview_plot(clients: list[dict]) -> str:
    fig, ax = plt.subplots(figsize=(7, 3.6))
    for c in clients:
        ax.plot(
            [x["round"] for x in c["rounds"]],
            [x["epsilon_after"] for x in c["rounds"]],
            marker="o",
            label=c["client"],
        )
    budgets = {c["budget"]["epsilon"] for c in clients}
    for b in budgets:
        ax.axhline(b, color="red", linestyle="--", label="budget" if b == max(budgets) else None)
    ax.set(xlabel="round", ylabel="cumulative ε", title="Privacy spent per client")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize="small", ncol=2)
    return _svg(fig)


def _table(headers: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _num(v: float | None, digits: int = 4) -> str:
    return "—" if v is None else f"{v:.{digits}f}"


def _client_section(c: dict) -> str:
    m = c["mechanism"]
    status = (
        '<span class="ok">verified</span>'
        if c["verified"]
        else f'<span class="bad">FAILED: {html.escape(c["problem"])}</span>'
    )
    rounds = _table(
        ["round", "status", "steps", "ε before", "ε after", "spent", "RDP", "PRV", "PLD"],
        [
            [
                str(x["round"]),
                html.escape(x["status"]),
                str(x["steps"]),
                _num(x["epsilon_before"]),
                _num(x["epsilon_after"]),
                _num(x["spent"]),
                _num(x["recomputed"].get("rdp")),
                _num(x["recomputed"].get("prv")),
                _num(x["recomputed"].get("pld")),
            ]
            for x in c["rounds"]
        ],
    )
    declined = ", ".join(map(str, c["declined_rounds"])) or "none"
    return f"""
<section class="client">
<h2>{html.escape(c["client"])} — {status}</h2>
<p>Budget ε = {c["budget"]["epsilon"]:g}, δ = {c["budget"]["delta"]:g}.
Spent ε = <b>{c["spent_epsilon"]:.4f}</b>, remaining {c["remaining_epsilon"]:.4f}.
Declined rounds: {declined}.</p>
<p>Mechanism: DP-SGD, noise multiplier σ = {m["noise_multiplier"]:.4f}, clipping norm
C = {m["clip_norm"]:g} per user, Poisson sample rate q = {m["sample_rate"]:.5f} (set by the
user count released with noise, {m["noisy_users"]:,}), {m["steps_per_round"]} steps per round,
planned for {m["planned_rounds"]} rounds, accountant {html.escape(m["accountant"].upper())}.
Signing key: {html.escape(c["key"])}.</p>
<figure>{_client_plot(c)}<figcaption>Cumulative ε by round, with the tight accountants' figures
for the same mechanism.</figcaption></figure>
{rounds}
</section>"""


def _audit_section(audit: dict | None) -> str:
    if not audit:
        return (
            "<p>No membership-inference audit for this run (see <code>fedshop privacy audit"
            "</code>).</p>"
        )
    if "attacks" not in audit:
        return f"<p>{AUDIT} predates LiRA; rerun <code>fedshop privacy audit</code>.</p>"
    names = {"loss": "loss threshold", "lira": "offline LiRA"}
    rows = [
        [
            html.escape(a["run"]),
            html.escape(str(a["epsilon"])),
            html.escape(names.get(attack, attack)),
            _num(roc["auc"], 3),
            _num(roc["tpr_at_fpr"]["0.01"], 3),
            _num(roc["tpr_at_fpr"]["0.001"], 3),
            f"{a['members']:,} / {a['non_members']:,}",
        ]
        for a in audit["runs"]
        for attack, roc in a["attacks"].items()
    ]
    table = _table(
        list(COLUMNS),
        rows,
    )
    described = "".join(
        f"<li><b>{html.escape(names.get(k, k))}</b>: {html.escape(v)}</li>"
        for k, v in audit["attacks"].items()
    )
    return (
        f"<ul>{described}</ul><p>{html.escape(audit['scope'])}</p>{table}"
        f"<p>{html.escape(AUDIT_CAVEAT)}</p>"
    )


def _secure_section(rounds: list[dict]) -> str:
    secured = [r for r in rounds if r["secure_aggregation"]]
    if not secured:
        return (
            "<p>No secure aggregation: the server received each client's DP update (inside "
            "that client's ε) and aggregated them itself.</p>"
        )
    items = "".join(
        f"<li>round {r['round']}: {s['clients']} clients, each secret in {s['num_shares']} "
        f"shares, {s['reconstruction_threshold']} to rebuild it; dropped: "
        f"{html.escape(', '.join(s['dropped']) or 'none')}</li>"
        for r in secured
        if (s := r["secure_aggregation"])
    )
    plain = [r["round"] for r in rounds if not r["secure_aggregation"]]
    rest = f"<p>Rounds in clear: {', '.join(map(str, plain))}.</p>" if plain else ""
    return (
        "<p>Training updates reached the server only as Flower SecAgg+ masked vectors; it "
        "learned their weighted sum, never one client's update. Beside each masked vector it "
        "saw the client's name, the ledger entry it cites and its DP metrics.</p>"
        f"<ul>{items}</ul>{rest}"
    )


def _central_section(central: dict | None) -> str:
    if not central:
        return "<p>No server-side (client-level) DP in this run.</p>"
    return (
        f"<p>Server-side DP with Flower's {html.escape(str(central['wrapper']))}: "
        f"noise multiplier {central['noise_multiplier']:g}, clipping norm "
        f"{central['clipping_norm']:g}. Client-level ε = <b>{_num(central.get('epsilon'))}</b> at "
        f"δ = {central['delta']:g} (Flower's RDP accountant): the model's weights would have "
        "been about as likely had any one <i>client</i> (all of its users) stayed out. "
        "This sits on top of the per-client user-level ε above. Not covered at client level: "
        "the model's item-popularity prior, the sum of the clients' noisy histograms, each "
        "covered only by its own client's user-level ε.</p>"
    )


CSS = """
body{font-family:system-ui,sans-serif;max-width:1000px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:0.5em 0 1.5em;font-size:0.9em}
th,td{border:1px solid #ccc;padding:0.25em 0.6em;text-align:right}
th{background:#f3f3f3} .ok{color:#176b2c} .bad{color:#b00020}
.summary{background:#f7f9fc;border-left:4px solid #3465a4;padding:0.5em 1em}
figure{margin:0} svg{max-width:100%;height:auto}
"""


def render(report: dict) -> str:
    """The page for the report's facts (`privacy.report.build`)."""
    v = report["verdict"]
    detail = f": {html.escape(v['problem'])}" if v["problem"] else ""
    verdict = f'<span class="{"ok" if v["ok"] else "bad"}">{html.escape(v["headline"])}</span>'
    verdict = f"<b>{verdict}</b>{detail}"
    ledgers = _table(
        ["ledger", "kind", "signer", "result", "notes"],
        [
            [
                html.escape(x["path"]),
                x["kind"],
                html.escape(x["signer"]),
                "verified" if x["ok"] else f'<span class="bad">{html.escape(x["problem"])}</span>',
                html.escape("; ".join(x["notes"])) or "—",
            ]
            for x in report["ledgers"]
        ],
    )
    overview = _table(
        ["client", "budget ε", "δ", "spent ε", "remaining", "σ", "declined", "verified"],
        [
            [
                html.escape(c["client"]),
                f"{c['budget']['epsilon']:g}",
                f"{c['budget']['delta']:g}",
                _num(c["spent_epsilon"]),
                _num(c["remaining_epsilon"]),
                _num(c["mechanism"]["noise_multiplier"]),
                str(len(c["declined_rounds"])),
                "yes" if c["verified"] else '<span class="bad">no</span>',
            ]
            for c in report["clients"]
        ],
    )
    worst = max((c["spent_epsilon"] for c in report["clients"]), default=0.0)
    plot = f"<figure>{_overview_plot(report['clients'])}</figure>" if report["clients"] else ""
    assumptions = "".join(f"<li>{html.escape(a)}</li>" for a in ASSUMPTIONS)
    threats = "".join(f"<li>{html.escape(t)}</li>" for t in THREATS)
    sections = "".join(_client_section(c) for c in report["clients"])
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>fedshop privacy report</title><style>{CSS}</style></head>
<body>
<h1>Privacy report</h1>
<div class="summary">
<p>{verdict}. {len(report["clients"])} client(s); the largest user-level ε spent by any
client is <b>{worst:.4f}</b>.</p>
<p>{GUARANTEE}</p>
<p>Against whom:</p><ul>{threats}</ul>
<p>It rests on these assumptions and does not cover:</p><ul>{assumptions}</ul>
<p>How to read the numbers: ε is reported by the accountant each client used (PRV's upper
bound unless it says otherwise); RDP, PRV and PLD bounds of the same mechanism are recomputed
here from the ledger alone. A verified ledger is intact (hash chain and Ed25519
signatures), its arithmetic holds, its budget, δ and mechanism never change, every ε agrees
with an independent recomputation within 1 %, and every reply in the server's record cites an
entry of the right kind, round and run in it. "Verified against pinned keys" means every
signature was checked with a public key from the folder given with <code>--keys</code>;
"internally consistent, keys not pinned" means the keys came from beside the ledgers, which
shows nothing changed after signing but not who signed.</p>
</div>
<h2>Clients</h2>{overview}{plot}
<h2>Secure aggregation</h2>{_secure_section(report.get("secure_aggregation", []))}
<h2>Client-level DP (server side)</h2>{_central_section(report["central_dp"])}
<h2>Empirical audit</h2>{_audit_section(report["audit"])}
<h2>Ledgers checked</h2>{ledgers}
{sections}
</body></html>
"""
