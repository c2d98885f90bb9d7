"""The local CoMiGS trainer (bi-level expert/router optimisation)."""
