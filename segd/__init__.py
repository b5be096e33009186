"""segd: label-based network micro-segmentation of containers with pairing keys."""

__version__ = "0.1.0"
