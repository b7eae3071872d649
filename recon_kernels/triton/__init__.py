"""Triton kernels and their launch helpers, one module per op family.

Imported lazily by ``recon_kernels.ops._dispatch`` so that the package imports without
triton. Set ``TRITON_INTERPRET=1`` before the first import to run them on CPU tensors.
"""
