"""The MLX backend of csm (Apple GPU; MLX's Linux CPU and CUDA builds)."""
