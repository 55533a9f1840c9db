"""Pallas attention kernels (TPU and GPU) and their pure-JAX references."""
