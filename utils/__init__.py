"""Shared machinery of the CoMat training scripts and pipeline: one module per concept of the paper."""
