"""Fused training kernels: Triton kernels with pure-PyTorch references and autograd functions.

One module per kernel (``rmsnorm``, ``rope``, ``swiglu``, ``fused_ce``) and ``patch.apply_kernels`` to put them
into a transformers model. This file stays import-free on purpose: transformers probes a top-level package named
``kernels`` (the HF hub library of that name) with ``importlib``, and must find nothing heavy here and no
``__version__`` (which would make it look like that library).
"""
