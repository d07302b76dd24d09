"""BLISS anomaly scoring: bias-corrected CLIP similarity scores (Goodge, Hooi, Ng; BMVC 2024).

The core library is pure numpy/torch/faiss and imports nothing from the server, the
indexer or the client. Importing ``bliss`` is cheap: heavy modules (torch, open_clip,
faiss) are imported by the submodules that need them.
"""

__version__ = "0.1.0"
