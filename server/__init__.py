"""The Flower ServerApp: strategy, round loop with checkpoints, federated evaluation, export."""
