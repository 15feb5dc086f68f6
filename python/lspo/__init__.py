"""lspo: fine-tune large language models on a small GPU by offloading to the CPU.

Native core in ``lspo._C`` (C++/CUDA); this package holds the PyTorch-facing optimizers.
"""
import torch  # noqa: F401  (loads LibTorch before the extension)

from . import _C
from ._C import LspoError, active_isa, detected_isa, get_num_threads, set_isa, set_num_threads
from .cpu_adam import CPUAdamW
from . import projector
from .projector import SparseProjector
from .optim import OffloadAdamW
from .lsp import LSPAdamW
from . import diag, distributed, meft, tinygpt

__version__ = "0.1.0"
with_cuda = bool(_C.with_cuda)

__all__ = [
    "CPUAdamW",
    "LSPAdamW",
    "LspoError",
    "OffloadAdamW",
    "SparseProjector",
    "active_isa",
    "detected_isa",
    "get_num_threads",
    "set_isa",
    "set_num_threads",
    "with_cuda",
]
