"""Registered components; importing this package fills the registries."""

from diagvi.components import alignment, classifiers, graph_encoders, likelihoods, priors

__all__ = ["alignment", "classifiers", "graph_encoders", "likelihoods", "priors"]
