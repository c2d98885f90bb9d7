"""Token data on the device: flat token files split into train / valid / test."""
