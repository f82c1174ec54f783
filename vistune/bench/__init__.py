"""Cost benchmarks: each method measured in a fresh subprocess, reported as ratios to a baseline of the same run."""
