"""Test configuration: run the Triton kernels under the interpreter when there is no GPU.

TRITON_INTERPRET must be set before any kernel is defined, i.e. before frod_kernels'
Triton backend is first imported; conftest runs before every test module.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(min(torch.get_num_threads(), 2))
