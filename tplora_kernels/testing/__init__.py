"""Tools for checking the package on several ranks and against exact math (like ``torch.testing``).

The test suite, the benchmark and the examples share them; nothing here imports pytest.

* ``tplora_kernels.testing.launch``: start ranks on this machine (a fresh gloo or NCCL world
  under a deadline, a persistent pool of gloo ranks for many small tasks, an example script's
  ranks) and end every process they start.
* ``tplora_kernels.testing.numerics``: absolute and relative errors (how zero and non-finite
  values count) and the one tolerance rule that judges a result against the fp64 math.
"""
