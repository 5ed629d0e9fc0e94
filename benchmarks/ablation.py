"""The model's design choices measured side by side on one data set, centralized: non-private and
DP-SGD (Opacus, user-level, ε for the whole run), full-ranking HR@10 / NDCG@10 on the test split.

    python benchmarks/ablation.py --data ../shared/data/ta-feng/ta_feng.csv.zip --format tafeng

Each row changes one thing from the default model; the DP rows train all users pooled with the
same σ-search Opacus uses in a client, so they show what noise costs each design.
"""

from __future__ import annotations

import argparse
import time

import torch

from common.data.formats import load_events
from common.data.synth import generate
from common.learning.configs import ModelConfig
from common.learning.dataset import prepare
from common.learning.model import BehaviorModel
from common.learning.training import adam, evaluate_ranking, loader, pick_device, train_epoch
from privacy.engine import PrivacyEngine

DEFAULT = ModelConfig()
VARIANTS: dict[str, dict] = {
    "default": {},
    "1 window": {"windows": 1},
    "4 windows": {"windows": 4},
    "item_dim 32": {"item_dim": 32},
    "item_dim 8": {"item_dim": 8},
}


def run(prepared, cfg: ModelConfig, args, epsilon: float | None) -> dict:
    torch.manual_seed(args.seed)
    device = pick_device(args.device)
    model = BehaviorModel(cfg, prepared.shape).to(device)
    batch = args.dp_batch if epsilon else args.batch
    opt = adam(model, args.lr)
    data = loader(prepared.train, batch, shuffle=True, seed=args.seed)
    if epsilon:
        engine = PrivacyEngine(accountant="prv")
        model, opt, data = engine.make_private_with_epsilon(
            module=model,
            optimizer=opt,
            data_loader=data,
            target_epsilon=epsilon,
            target_delta=args.delta,
            epochs=args.epochs,
            max_grad_norm=1.0,
            loss_reduction="sum",
        )
    start = time.perf_counter()
    for _ in range(args.epochs):
        train_epoch(model, data, opt, device, cfg.demand_weight)
    seconds = (time.perf_counter() - start) / args.epochs
    core = getattr(model, "_module", model)
    test = evaluate_ranking(core, prepared.test, device)["full"]
    return {"seconds_per_epoch": seconds, **test}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", default="")
    parser.add_argument("--format", default="auto")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--dp-batch", type=int, default=512)
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--epsilon", type=float, default=8.0)
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS))
    args = parser.parse_args()
    if args.data:
        result = load_events(args.data, args.format)
        events, top = result.events, result.spec.top_category_chars
    else:
        events, top = generate(), None
    cache = {}
    print(f"{'variant':<14} {'privacy':<10} {'HR@10':>7} {'NDCG@10':>8} {'s/epoch':>8}", flush=True)
    for name in args.variants:
        cfg = DEFAULT.model_copy(update=VARIANTS[name])
        if cfg.history not in cache:
            cache[cfg.history] = prepare(events, top_category_chars=top, history_len=cfg.history)
        for epsilon in (None, args.epsilon):
            r = run(cache[cfg.history], cfg, args, epsilon)
            label = f"ε={epsilon:g}" if epsilon else "none"
            print(
                f"{name:<14} {label:<10} {r['hr@10']:>7.4f} {r['ndcg@10']:>8.4f} "
                f"{r['seconds_per_epoch']:>8.1f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
