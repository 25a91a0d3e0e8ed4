"""Backends implementing the FRoD primitives: ``torch_backend`` (any device) and ``triton_backend``
(CUDA, or CPU under TRITON_INTERPRET=1). Both expose ``dual_matmul``, ``m_matmul`` and ``sddmm``
with the semantics documented in ``torch_backend``; ``dispatch.get_backend`` imports them lazily
and, for "triton", chooses per primitive (``dispatch.primitive_backend``). ``self_check`` compares
the Triton kernels with PyTorch the first time they run on a CUDA device and dtype.
"""
