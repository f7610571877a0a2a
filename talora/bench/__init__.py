"""Benchmarks: speed of the hot paths (`speed`) and the demo models report (`demo_models`)."""
