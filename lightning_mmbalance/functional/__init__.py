"""The pure math of every method: no Lightning, unit-tested against the specifications' golden values."""

from lightning_mmbalance.functional.agm import (
    agm_coefficients,
    agm_masked_coalitions,
    agm_mono_responses,
    agm_ratios,
    agm_scores,
    agm_update_running,
)
from lightning_mmbalance.functional.arl import arl_coefficients
from lightning_mmbalance.functional.gradient_blending import gblend_weights
from lightning_mmbalance.functional.inforeg import (
    inforeg_coefficients,
    inforeg_gaps,
    inforeg_growth,
    inforeg_proximal_,
    inforeg_trace_term,
    inforeg_window_open,
)
from lightning_mmbalance.functional.mmpareto import mmpareto_combine, pareto_weights
from lightning_mmbalance.functional.ogm_ge import ogm_coefficients, ogm_scores
from lightning_mmbalance.functional.opm import (
    opm_drop_features,
    opm_drop_probabilities,
    opm_generator,
    opm_keep_masks,
    opm_theta,
)
from lightning_mmbalance.functional.relearning import clustering_purity, relearning_alpha

__all__ = [
    "agm_coefficients",
    "agm_masked_coalitions",
    "agm_mono_responses",
    "agm_ratios",
    "agm_scores",
    "agm_update_running",
    "arl_coefficients",
    "clustering_purity",
    "gblend_weights",
    "inforeg_coefficients",
    "inforeg_gaps",
    "inforeg_growth",
    "inforeg_proximal_",
    "inforeg_trace_term",
    "inforeg_window_open",
    "mmpareto_combine",
    "ogm_coefficients",
    "ogm_scores",
    "opm_drop_features",
    "opm_drop_probabilities",
    "opm_generator",
    "opm_keep_masks",
    "opm_theta",
    "pareto_weights",
    "relearning_alpha",
]
