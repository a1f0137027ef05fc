"""Triton kernels, one module per op family. Imported lazily: importing triton is slow."""
