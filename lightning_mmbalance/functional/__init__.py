"""The pure math of every method: no Lightning, unit-tested against the specifications' golden values."""

from lightning_mmbalance.functional.arl import arl_coefficients
from lightning_mmbalance.functional.gradient_blending import gblend_weights
from lightning_mmbalance.functional.mmpareto import mmpareto_combine, pareto_weights
from lightning_mmbalance.functional.ogm_ge import ogm_coefficients, ogm_scores
from lightning_mmbalance.functional.relearning import clustering_purity, relearning_alpha

__all__ = [
    "arl_coefficients",
    "clustering_purity",
    "gblend_weights",
    "mmpareto_combine",
    "ogm_coefficients",
    "ogm_scores",
    "pareto_weights",
    "relearning_alpha",
]
