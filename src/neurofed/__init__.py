"""neurofed: federated deep learning on brain MRI."""

__version__ = "0.1.0"
