"""Speed and memory benchmarks (see bench/README section in the project README)."""
