"""Per-rank LoRA ops: the Triton kernels, the backends that run them, and their launch wrappers.

In layer order: ``kernels`` (the Triton kernels) and ``configs`` (their launch tables);
``registry`` (the ``Backend`` base class and the names); the built-in backends ``triton_backend``
(``triton``, ``interpret``), ``cublas_backend`` and ``torch_backend``, registered here; ``select``
(which backend runs a call); ``launch`` (check, allocate, hand to a backend).
"""

from . import cublas_backend, torch_backend, triton_backend  # noqa: F401  (importing registers them)
