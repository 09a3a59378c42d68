"""Command-line entry points (csm-generate, csm-watermark)."""
