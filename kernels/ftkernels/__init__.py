"""Fused training kernels: Triton kernels with pure-PyTorch references and autograd functions.

One module per kernel (``rmsnorm``, ``rope``, ``swiglu``, ``fused_ce``) and ``patch.apply_kernels`` to put them
into a transformers model. The package is named ``ftkernels`` (in the top-level ``kernels/`` folder) because a
top-level ``kernels`` would shadow Hugging Face's hub library of that name, which transformers and bitsandbytes import.
This file stays import-free so that importing one kernel does not import the others.
"""
