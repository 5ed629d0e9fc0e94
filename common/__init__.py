"""Shared building blocks: the event table, data loading, sequences, model, metrics.

Nothing in here imports the other fedshop packages.
"""
