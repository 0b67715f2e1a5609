"""Triton kernels of autolr_fast (installed as ``autolr_fast.kernels``)."""
