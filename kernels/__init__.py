"""Custom kernels, each registered beside a plain-PyTorch fallback and tested against it.

Empty for now: the engine runs on stock PyTorch operators only.
"""
