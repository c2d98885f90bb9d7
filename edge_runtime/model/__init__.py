"""The CoMiGS model: a frozen causal LM whose MLPs hold LoRA experts and a per-token router."""
