"""The tensor-parallel mode of a layer: one frozen value, normalised once.

A Megatron parallel linear is column- or row-parallel, in a TP group, with sequence
parallelism on or off, possibly gathering its output (column) or splitting its input (row),
possibly leaving its communication to an MoE token dispatcher (``explicit_comm``), possibly
returning another dtype than its input's. ``TPMode.build`` turns those flags into what actually
happens at this group's size, in one place: at TP size 1 there is nothing to gather, split or
scatter, so sequence parallelism and ``gather_output`` are off and the input is parallel. The
recognisers (``base``), the functional API, the autograd plans, the base layer alone
(``mappings``) and the references all take this value instead of re-deriving it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from . import distributed as D

__all__ = ["KINDS", "TPMode"]

KINDS = ("column", "row")
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True, eq=False)
class TPMode:
    """How a parallel linear communicates at its group's size (build it with ``TPMode.build``).

    Attributes:
        kind: ``"column"`` (output split) or ``"row"`` (input split).
        group: the TP process group (None: the default group, or no torch.distributed).
        world: the group's size t. rank: this rank in it.
        sequence_parallel: x (column) or y (row) holds this rank's rows of the sequence.
        gather_output: column: all-gather the output columns.
        input_is_parallel: row: x is already this rank's K/t slice (always True for column).
        explicit_comm: the layer does no TP communication itself (an MoE expert: the token
            dispatcher gathers its input and reduces its output); outputs and dX stay partial.
        output_dtype: the output's dtype when it differs from the input's, else None.

    Example:
        >>> m = TPMode.build("row", sequence_parallel=True, input_is_parallel=False)
        >>> (m.world, m.sequence_parallel, m.input_is_parallel)    # nothing to split at TP size 1
        (1, False, True)
    """

    kind: str
    group: dist.ProcessGroup | None
    world: int
    rank: int
    sequence_parallel: bool
    gather_output: bool
    input_is_parallel: bool
    explicit_comm: bool
    output_dtype: torch.dtype | None

    @classmethod
    def build(cls, kind: str, *, group: dist.ProcessGroup | None = None, sequence_parallel: bool = False,
              gather_output: bool = False, input_is_parallel: bool = True, explicit_comm: bool = False,
              output_dtype: torch.dtype | None = None) -> TPMode:
        """The mode of a ``kind`` layer in ``group`` with these flags, normalised for the group's size.

        Args:
            kind: ``"column"`` or ``"row"``.
            group: the layer's TP group.
            sequence_parallel, gather_output, input_is_parallel: the base layer's flags.
            explicit_comm: the base layer leaves its communication to the token dispatcher.
            output_dtype: the base GEMM's output dtype (None: the input's).

        Returns:
            The mode.

        Raises:
            ValueError: an unknown kind, or ``explicit_comm`` with a flag that needs a collective
                (sequence parallelism, ``gather_output``, a non-parallel row input).
            TypeError: an output_dtype that is not fp32/fp16/bf16.
        """
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        if output_dtype is not None and output_dtype not in _DTYPES:
            raise TypeError(f"output_dtype must be None or one of float32, float16, bfloat16, got {output_dtype!r}")
        world, rank = D.group_size(group), D.group_rank(group)
        sp = bool(sequence_parallel) and world > 1
        gather = kind == "column" and bool(gather_output) and world > 1
        parallel_in = kind == "column" or bool(input_is_parallel) or world == 1
        if explicit_comm and (sp or gather or not parallel_in):
            raise ValueError("explicit_comm (an MoE expert layer whose token dispatcher communicates) excludes "
                             "sequence_parallel, gather_output and a non-parallel row input")
        return cls(kind, group, world, rank, sp, gather, parallel_in, bool(explicit_comm), output_dtype)

    def with_gather(self, gather_output: bool) -> TPMode:
        """This mode with ``gather_output`` set for one call (Megatron's ``runtime_gather_output``)."""
        return TPMode.build(self.kind, group=self.group, sequence_parallel=self.sequence_parallel,
                            gather_output=gather_output, input_is_parallel=self.input_is_parallel,
                            explicit_comm=self.explicit_comm, output_dtype=self.output_dtype)
