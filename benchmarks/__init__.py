"""Per-layer and end-to-end benchmarks of aofx; run each as ``python -m benchmarks.<name>`` from the repository root."""
