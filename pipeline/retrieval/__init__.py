"""FAISS factory checks, index build and search, and the gallery that `clipline add` extends."""
