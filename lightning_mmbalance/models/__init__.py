"""Reference models that satisfy the balancing callbacks' contract."""

from lightning_mmbalance.models.late_fusion import LateFusionClassifier

__all__ = ["LateFusionClassifier"]
