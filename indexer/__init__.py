"""The offline indexer: turns a model, a dictionary and labelled normal images into an
index version (a FAISS file plus rows in the statistics store).

Stages, each resumable and idempotent: dictionary embeddings -> FAISS index -> normal
embeddings and class prompts -> per-class statistics -> store rows -> ready (-> active).
"""
