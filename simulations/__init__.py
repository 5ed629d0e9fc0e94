"""Local runs: the command line, the centralized baseline and (later) federated simulation."""
