"""Experiment drivers: `python -m experiments.bench CONFIG` (benchmarks, see BENCHMARKS.md) and
`python -m experiments.quant_error` (quantizer error against llama.cpp)."""
