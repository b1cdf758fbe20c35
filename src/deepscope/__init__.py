"""deepscope: train, evaluate and apply deep learning models for vision and biomedical images."""

__version__ = "0.2.0"
