"""The gRPC coordinator that averages generalist deltas. Must never import torch."""
