"""mlx-mistral: Mistral-7B-Instruct-v0.2 on your own machine, on MLX."""

__version__ = "0.1.0"
