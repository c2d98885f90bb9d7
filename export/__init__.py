"""Turns a base model plus CoMiGS experts into ExecuTorch and ONNX artifacts (see issue: export)."""
