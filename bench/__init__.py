"""Speed and memory benchmarks (see docs/benchmarks.md)."""
