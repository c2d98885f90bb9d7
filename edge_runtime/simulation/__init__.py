"""In-process federated simulation of CoMiGS and its baselines (the paper's table)."""
