"""diagvi: integrate two unpaired single-cell modalities with DiagVI."""

from diagvi import components  # noqa: F401  (fills the registries)
from diagvi.errors import DataError
from diagvi.graph import build_guidance_graph
from diagvi.metrics import foscttm
from diagvi.model import DIAGVI
from diagvi.registry import ALIGNMENTS, CLASSIFIERS, GRAPH_ENCODERS, LIKELIHOODS, PRIORS

__version__ = "0.1.0"
__all__ = [
    "ALIGNMENTS",
    "CLASSIFIERS",
    "DIAGVI",
    "GRAPH_ENCODERS",
    "LIKELIHOODS",
    "PRIORS",
    "DataError",
    "build_guidance_graph",
    "foscttm",
]
