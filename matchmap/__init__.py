"""matchmap: spoken-query image search with matchmap networks.

This package holds only the command-line root; the work lives in the top-level packages
``encoders``, ``training``, ``indexer``, ``search`` and ``protos``.
"""

__version__ = "0.1.0"
