"""densessl: reproducibility workflow for dense self-supervised vision representation learning."""

__version__ = "0.1.0"
