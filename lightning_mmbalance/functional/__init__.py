"""The pure math of every method: no Lightning, unit-tested against the specifications' golden values."""

from lightning_mmbalance.functional.ogm_ge import ogm_coefficients, ogm_scores

__all__ = ["ogm_coefficients", "ogm_scores"]
