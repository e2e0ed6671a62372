"""Agreement and collection across ranks: how every adapter path stays rank-symmetric at any layout.

Two steps, in this order, in every call that reads or writes adapters of a parallel model:

1. **Agreement** (``agree``): every rank of the calling group runs its local checks and reports
   what it holds (canonical names, options, its peers' ranks) or the error it hit, in one small
   object all-gather. That all-gather is the call's first collective and every rank reaches it,
   errors included; then every rank raises the same error, or every rank knows the whole model
   (every stage, chunk and expert-parallel rank). So a refused call never leaves a rank waiting.
2. **Collection** (``iter_full_factors``): layer by layer in canonical order, the ranks whose
   tensor-parallel group holds a layer's *owner* (the lowest global rank holding it) all-gather
   its sharded factor over that TP group, and the owner hands the full factors to the destination
   rank (point to point) or to every rank (broadcast). Other replicas of a layer (data-parallel
   copies) do no work for it. Memory stays bounded by one layer at a time.

Single-process use (torch.distributed not initialised) needs no communication at all.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.distributed as dist

from ..naming import LoRASite, layer_key

__all__ = ["FullFactors", "Scope", "agree", "full_factors", "iter_full_factors", "layer_order", "peers_of",
           "touch_factors"]


@dataclass(frozen=True)
class Scope:
    """The ranks that make one call together.

    Attributes:
        group: their process group (None: the default group, or no torch.distributed).
        rank: this rank's index in ``group``.
        ranks: the global rank of each group rank.
    """

    group: dist.ProcessGroup | None
    rank: int
    ranks: tuple[int, ...]

    @classmethod
    def of(cls, group: dist.ProcessGroup | None) -> Scope:
        """The scope of ``group`` (the whole job by default; one rank without torch.distributed)."""
        if not (dist.is_available() and dist.is_initialized()):
            return cls(None, 0, (0,))
        ranks = tuple(dist.get_process_group_ranks(group)) if group is not None else tuple(range(dist.get_world_size()))
        return cls(group, dist.get_rank(group), ranks)

    @property
    def distributed(self) -> bool:
        """More than one rank takes part."""
        return len(self.ranks) > 1

    @property
    def me(self) -> int:
        """This rank's global rank."""
        return self.ranks[self.rank]

    def exchange(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in group-rank order (one object all-gather)."""
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * len(self.ranks)
        dist.all_gather_object(out, obj, group=self.group)
        return out


_RAISABLE = (ValueError, TypeError, OSError, KeyError, RuntimeError)


def agree(scope: Scope, local: Callable[[], Any], what: str) -> list[Any]:
    """Run ``local()`` on every rank and exchange the results; if any rank raised, raise on every rank.

    Args:
        scope: the calling ranks.
        local: this rank's checks and report (may raise).
        what: the call's name, for messages.

    Returns:
        Every rank's report, in group-rank order.

    Raises:
        The first failing rank's exception type (ValueError, TypeError, OSError, KeyError,
        RuntimeError; anything else as RuntimeError), on every rank, naming the rank(s) and the error.
    """
    try:
        report, error = local(), None
    except Exception as e:  # reported to every rank below, then raised everywhere
        report, error = None, (type(e).__name__, str(e))
        if not scope.distributed:
            raise
    reports = scope.exchange((error, report))
    failed = [(scope.ranks[i], e) for i, (e, _) in enumerate(reports) if e is not None]
    if failed:
        messages = sorted({m for _, (_, m) in failed})
        names = sorted({n for _, (n, _) in failed})
        kind = next((t for t in _RAISABLE if t.__name__ == failed[0][1][0]), RuntimeError)
        where = f"rank {failed[0][0]}" if len(failed) == 1 else f"ranks {[r for r, _ in failed]}"
        raise kind(f"{what} refused on every rank ({where} found: {'; '.join(messages)})"
                   + (f" [{', '.join(names)}]" if kind is RuntimeError else ""))
    return [r for _, r in reports]


def peers_of(sites: Sequence[LoRASite]) -> set[int]:
    """Global ranks that must take part with this rank: its sites' TP groups, expert-parallel and pipeline peers."""
    if not (dist.is_available() and dist.is_initialized()):
        return set()
    out: set[int] = set()
    for s in sites:
        if s.module.spec.mode.group is not None:
            out.update(dist.get_process_group_ranks(s.module.spec.mode.group))
    try:
        from megatron.core import parallel_state as ps

        if ps.model_parallel_is_initialized():
            out.update(dist.get_process_group_ranks(ps.get_pipeline_model_parallel_group()))
            if any(".local_experts." in s.name for s in sites):
                out.update(dist.get_process_group_ranks(ps.get_expert_model_parallel_group()))
    except (ImportError, AssertionError, RuntimeError):
        pass
    return out


def check_complete(scope: Scope, peers: Sequence[set[int]], what: str) -> None:
    """Raise (on every rank: ``peers`` came from ``agree``) unless the group holds every peer of every rank.

    A group without some pipeline stage or expert-parallel rank would write a file without its
    layers, and one without a whole TP group would hang in its all-gather.
    """
    outside = sorted(set().union(*peers) - set(scope.ranks)) if peers else []
    if outside:
        raise ValueError(f"{what}: group= must hold every rank of the model's pipeline, expert-parallel and "
                         f"tensor-parallel groups (it lacks global ranks {outside[:8]}); pass the whole job "
                         "(group=None) or a group that spans whole pipelines")


def _order_key(key: str) -> tuple:
    return tuple((0, int(p)) if p.isdigit() else (1, p) for p in re.split(r"\.", key))


def layer_order(names: Sequence[str]) -> list[str]:
    """The layer keys of ``names`` (``naming.layer_key``) in a fixed order that every rank computes alike."""
    return sorted({layer_key(n) for n in names}, key=_order_key)


class FullFactors(NamedTuple):
    """One layer's adapter as full tensors: ``a [r, K]``, ``b [N, r]``, and DoRA's ``magnitude [N]`` (or None)."""

    a: torch.Tensor
    b: torch.Tensor
    magnitude: torch.Tensor | None = None


def full_factors(module: torch.nn.Module, adapter: str) -> FullFactors:
    """The full factors (and DoRA magnitude) of one layer's adapter: an all-gather over its TP group.

    The factors are read through their holder modules' calls (``lora_A[adapter]()``), so hooks
    that fill a parameter before its owner runs (Megatron DDP's ``overlap_param_gather``, FSDP)
    see the read. Every rank of the layer's TP group must call it, in the same order. The
    magnitude is split as B's rows, and joined by the same rule.
    """
    layout, group = module.spec.layout, module.spec.mode.group
    a = module.lora_A[adapter]().detach()
    b = module.lora_B[adapter]().detach()
    full_a, full_b = layout.gather_factors(a, b, group)
    magnitude = None
    if adapter in module.lora_magnitude_vector:
        local = module.lora_magnitude_vector[adapter]().detach()
        magnitude = layout.lora_b.gather(local.reshape(-1, 1), group).reshape(-1).clone()
    return FullFactors(full_a.clone(), full_b.clone(), magnitude)


def touch_factors(sites: Sequence[LoRASite]) -> None:
    """Call every factor holder of ``sites``, in order, as a forward would (no copy, no kernel).

    Under Megatron DDP's ``overlap_param_gather`` a step's updated factors arrive in the holders'
    forward pre-hooks, and the first hook of a bucket starts an all-gather over the data-parallel
    group. Every rank calls every holder here, owner or not, so every data-parallel rank joins the
    same gathers in the same order and the factors read afterwards are the updated ones.
    """
    for s in sites:
        for holders in (s.module.lora_A, s.module.lora_B):
            for name in s.module.adapter_names:
                holders[name]()


def _tp_ranks(site: LoRASite) -> list[int]:
    tp = site.module.spec.mode.group
    return dist.get_process_group_ranks(tp) if tp is not None else list(range(dist.get_world_size()))


def iter_full_factors(scope: Scope, sites: Sequence[LoRASite], holders: dict[str, list[int]], adapter: str, *,
                      dst: int | None) -> Iterator[tuple[str, dict[str, FullFactors]]]:
    """Yield ``(layer key, {canonical name: FullFactors on the CPU})`` layer by layer.

    Args:
        scope: the calling ranks (every one must iterate to the end: the transfers are collectives).
        sites: this rank's LoRA layers.
        holders: ``{canonical name: global ranks holding it}`` over the scope (from ``agree``).
        adapter: the adapter to collect.
        dst: the group rank that receives (the others yield nothing), or None for every rank.

    Yields:
        On receiving ranks, each layer's factors in canonical order.
    """
    touch_factors(sites)
    mine: dict[str, LoRASite] = {s.name: s for s in sites}
    owner = {name: min(ranks) for name, ranks in holders.items()}
    dst_global = None if dst is None else scope.ranks[dst]
    for key in layer_order(list(holders)):
        names = [n for n in sorted(holders, key=_order_key) if layer_key(n) == key]
        local: dict[str, FullFactors] = {}
        for name in names:
            site = mine.get(name)
            if site is None:
                continue
            if not scope.distributed or owner[name] in _tp_ranks(site):
                full = full_factors(site.module, adapter)
                if owner[name] == scope.me:
                    local[name] = FullFactors(*(None if t is None else t.cpu().contiguous() for t in full))
        got: dict[str, FullFactors] = {}
        for src in sorted({owner[n] for n in names}):
            if not scope.distributed:
                payload = [local]
            elif dst_global is None:
                payload = [local if src == scope.me else None]
                dist.broadcast_object_list(payload, src=src, group=scope.group)
            elif src == dst_global:
                if src != scope.me:
                    continue
                payload = [local]
            elif src == scope.me:
                dist.send_object_list([local], dst=dst_global, group=scope.group)
                continue
            elif dst_global == scope.me:
                payload = [None]
                dist.recv_object_list(payload, src=src, group=scope.group)
            else:
                continue
            got.update(payload[0])
        if dst_global is None or dst_global == scope.me:
            yield key, {n: got[n] for n in names}
