"""Backends implementing the FRoD primitives: ``torch_backend`` (any device) and ``triton_backend``
(CUDA, or CPU under TRITON_INTERPRET=1). Both expose ``dual_matmul``, ``m_matmul`` and ``sddmm``
with the semantics documented in ``torch_backend``; ``dispatch.get_backend`` imports them lazily.
"""
