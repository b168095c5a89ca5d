"""Side-by-side speed and memory benchmarks (never timed unit tests)."""
