"""Test configuration: run the Triton kernels under the interpreter when there is no GPU.

TRITON_INTERPRET must be set before any kernel is defined, i.e. before frod_kernels'
Triton backend is first imported; conftest runs before every test module.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Test problems are small: one thread is as fast as two for them and does not stall when the
# (2-core) CI machine is busy with something else.
torch.set_num_threads(1)
