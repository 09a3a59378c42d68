"""Speed and memory measurements of csm (run as `python -m benchmarks.<name>`)."""
