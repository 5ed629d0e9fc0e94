"""Shared building blocks, in two floors: `common.data` (events, formats, sequences, …) and
`common.learning` (model, training, metrics, forecasting, …), plus the run configuration,
atomic file writes and the names shared across processes.

Nothing in here imports the other fedshop packages.
"""
