"""aapo: Advantage-Augmented Policy Optimization (arXiv 2505.14264) and its baselines on DeepSpeed."""

__version__ = "0.1.0"
