"""The PyTorch backend of csm (CUDA, CPU, MPS)."""
