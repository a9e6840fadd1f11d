"""Thanos (placeholder)."""

def thanos(weight, hessian, pattern, *, blocksize=128, damp=0.01):
    raise NotImplementedError
