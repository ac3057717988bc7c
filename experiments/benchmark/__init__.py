"""Benchmark of diagvi against a joint-PCA baseline and scvi-tools' DIAGVI (see README.md)."""
