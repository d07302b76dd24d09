"""Evaluation and diagnostics: reproduce the paper's benchmarks and show the similarity bias.

``bliss eval`` encodes a benchmark once per model (cached on disk), scores every trial with
the library's own :class:`~bliss.scorer.Scorer` and reports AUROC, AUPR and FPR95 in the
paper's layout; ``bliss diagnose`` measures the text clustering effect of a stored index
version. Nothing here imports torch, open_clip, faiss or matplotlib at module import.
"""
