"""curation: metadata-balanced curation of web image-text pairs on Ray.

Heavy modules (ray, matplotlib, fastwarc) are imported lazily by the modules that need them.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
