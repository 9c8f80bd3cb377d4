"""lightclip: small, fast text-image retrieval models from an e-commerce catalogue."""

__version__ = "0.1.0"
