"""Training throughput of the default model on the default synthetic data, measured side by side:
non-private vs DP-SGD (Opacus, Poisson sampling, per-user clipping), plus generator speed.

    python benchmarks/throughput.py [--steps 30]
"""

from __future__ import annotations

import argparse
import time

import torch
from opacus import PrivacyEngine

from common.dataset import prepare
from common.model import BehaviorModel, ModelConfig, per_user_loss, trim
from common.synth import SynthConfig, generate
from common.training import loader, pick_device


def users_per_second(model, optimizer, batches, steps: int, demand_weight: float, device) -> float:
    model.train()
    done, start, it = 0, None, iter(batches)
    for step in range(steps + 3):
        if step == 3:  # first steps warm up allocators and kernels
            start, done = time.perf_counter(), 0
        batch = tuple(t.to(device) for t in trim(next(it)))
        total, _, _ = per_user_loss(model, batch, demand_weight)
        optimizer.zero_grad(set_to_none=True)
        total.mean().backward()
        optimizer.step()
        done += len(batch[0])
    if device.type == "cuda":
        torch.cuda.synchronize()
    return done / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--device", default="auto", help="auto (CUDA if present), cpu or cuda")
    args = parser.parse_args()
    device = pick_device(args.device)

    start = time.perf_counter()
    generate(SynthConfig(events=1_000_000, users=30_000, items=20_000))
    synth_s = time.perf_counter() - start

    cfg = ModelConfig()
    prepared = prepare(generate(), top_category_chars=None, max_len=cfg.max_len)
    torch.manual_seed(0)
    plain = BehaviorModel(cfg, prepared.shape).to(device)
    plain_rate = users_per_second(
        plain,
        torch.optim.Adam(plain.parameters(), 1e-3),
        loader(prepared.train, args.batch, shuffle=True),
        args.steps,
        cfg.demand_weight,
        device,
    )
    torch.manual_seed(0)
    private = BehaviorModel(cfg, prepared.shape).to(device)
    dp_model, dp_opt, dp_loader = PrivacyEngine().make_private(
        module=private,
        optimizer=torch.optim.Adam(private.parameters(), 1e-3),
        data_loader=loader(prepared.train, args.batch, shuffle=True),
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        poisson_sampling=True,
    )
    dp_rate = users_per_second(dp_model, dp_opt, dp_loader, args.steps, cfg.demand_weight, device)

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"machine: {torch.get_num_threads()} torch threads, device {name}")
    print(f"synthetic generator: 1,000,000 events in {synth_s:.1f} s")
    print(
        f"model: {sum(p.numel() for p in plain.parameters()):,} parameters, "
        f"{prepared.shape.items} items, max_len {cfg.max_len}, batch {args.batch}"
    )
    print(f"non-private training: {plain_rate:8.1f} users/s")
    print(f"DP-SGD (Opacus):      {dp_rate:8.1f} users/s")
    print(f"DP / non-private:     {dp_rate / plain_rate:8.2f}x")


if __name__ == "__main__":
    main()
