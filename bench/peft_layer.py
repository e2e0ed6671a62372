"""The real peer: PEFT's own ``LoraParallelLinear`` (``peft.tuners.lora.tp_layer``) on megatron-core layers.

``reference`` in this bench is our torch emulation of that layer's structure; this module builds
the layer itself, as a user of peft 0.21.2 with megatron-core 0.16.1 gets it from PEFT's
``dispatch_megatron``, with the same weights as the other contenders.

It does not run as shipped. Its users work around three defects, and so does the bench:

1. ``dispatch_megatron`` reads ``kwargs["fan_in_fan_out"]``, which ``LoraModel`` never passes
   (KeyError): we call the dispatcher with ``fan_in_fan_out=False`` ourselves.
2. ``LoraParallelLinear.update_layer`` never sets ``lora_bias[adapter]``, which
   ``reset_lora_parameters`` reads (KeyError 'default'): ``_lora_bias_defaults_to_false`` sets it
   first, as the unmerged fix (huggingface/peft#2621) does.
3. Its forward computes ``lora_B(lora_A(dropout(x))) * scaling``, but the LoRA factor that is a
   Megatron layer (column: ``lora_B``, a ColumnParallelLinear; row: ``lora_A``, a
   RowParallelLinear) returns Megatron's ``(output, bias)`` tuple (column: "can't multiply
   sequence by non-int of type 'float'"; row: nn.Linear gets a tuple): ``_output_only`` makes that
   factor return its output alone.

PEFT creates those factor layers without a ``tp_group``, so megatron-core takes its TP group from
``parallel_state``, which the bench's ranks therefore initialise (``init_parallel_state``).

Where it runs (``unsupported``): megatron-core's own sequence-parallel all-gather and
reduce-scatter, its ``gather_output=True`` gather and its ``input_is_parallel=False`` backward
allocate with ``torch.cuda.current_device()``, so on CPU it runs the bench's modes with SP off
only (column with ``gather_output=False``, row with ``input_is_parallel=True``), at every TP size.
On CUDA it runs every mode with a process group; never in an emulated case.
"""

from __future__ import annotations

import contextlib
import importlib.util
import warnings

__all__ = ["build_peft_layer", "init_parallel_state", "shutdown_parallel_state", "unsupported"]

ADAPTER = "default"


def quiet_megatron() -> None:
    """Silence megatron-core's advice, printed once per rank, that would interleave with the results:
    at import, that Transformer Engine and Apex are absent; at PEFT's first backward, to set
    CUDA_DEVICE_MAX_CONNECTIONS=1 for async all-reduce (a CUDA stream hint, moot on CPU)."""
    for message in ("Transformer Engine and Apex are not installed", "When using async grad allreduce"):
        warnings.filterwarnings("ignore", message=message, category=UserWarning)


def unsupported(case, device_type: str, has_group: bool = True) -> str | None:
    """Why PEFT's layer cannot run ``case`` on ``device_type``, or None when it can (see module docstring)."""
    for mod in ("peft", "megatron.core"):
        try:
            if importlib.util.find_spec(mod) is None:
                return f"{mod} is not installed"
        except ModuleNotFoundError:
            return f"{mod} is not installed"
    if case.emulated or not has_group:
        return "no process group here (one GPU or an emulated TP size); megatron-core's layers need one"
    if device_type == "cpu" and case.sp:
        return "megatron-core's sequence-parallel collectives allocate with torch.cuda.current_device()"
    return None


def init_parallel_state(world: int) -> None:
    """Megatron's global TP group over all ``world`` ranks, where PEFT's factor layers look for it."""
    quiet_megatron()
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=world)


def shutdown_parallel_state() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()


@contextlib.contextmanager
def _lora_bias_defaults_to_false(tp_layer):
    """Defect 2: set ``lora_bias[adapter]`` before PEFT's ``update_layer`` reads it."""
    original = tp_layer.LoraParallelLinear.update_layer

    def update_layer(self, adapter_name, *args, **kwargs):
        self.lora_bias.setdefault(adapter_name, False)
        return original(self, adapter_name, *args, **kwargs)

    tp_layer.LoraParallelLinear.update_layer = update_layer
    try:
        yield
    finally:
        tp_layer.LoraParallelLinear.update_layer = original


def _output_only(module) -> None:
    """Defect 3: this Megatron factor layer returns ``output`` instead of ``(output, bias)``."""
    forward = module.forward
    module.forward = lambda *args, **kwargs: forward(*args, **kwargs)[0]


def build_peft_layer(kind: str, *, w, a, b, r: int, scale: float, p: float, group, tp: int):
    """PEFT's ``LoraParallelLinear`` around a frozen Megatron layer holding ``w``, with factors ``a``, ``b``.

    Args:
        kind: ``"column"`` (ColumnParallelLinear, gather_output=False) or ``"row"``
            (RowParallelLinear, input_is_parallel=True); SP off.
        w: this rank's base weight shard (its dtype is the base layer's).
        a, b: this rank's fp32 LoRA factors (column: A [r, K], B_i [N/t, r]; row: A_i [r, K/t], B [N, r]).
        r, scale, p: LoRA rank, scaling (lora_alpha = scale·r) and dropout.
        group: the TP process group; tp: its size.

    Returns:
        ``(layer, params)``: the layer (its forward returns ``(y, bias)``) and every tensor it holds.
    """
    import torch
    from megatron.core import ModelParallelConfig
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from peft import LoraConfig
    from peft.tuners.lora import tp_layer

    on_cpu = w.device.type == "cpu"

    def config(dtype):
        return ModelParallelConfig(tensor_model_parallel_size=tp, use_cpu_initialization=on_cpu,
                                   perform_initialization=False, params_dtype=dtype)

    n, k = w.shape
    full_in, full_out = (k, n * tp) if kind == "column" else (k * tp, n)
    common = dict(config=config(w.dtype), init_method=torch.nn.init.zeros_, bias=False, tp_group=group)
    if kind == "column":
        base = ColumnParallelLinear(full_in, full_out, gather_output=False, **common)
    else:
        base = RowParallelLinear(full_in, full_out, input_is_parallel=True, skip_bias_add=False, **common)
    with torch.no_grad():
        base.weight.copy_(w)
    base.weight.requires_grad_(False)  # frozen, as get_peft_model leaves it
    # PEFT sets params_dtype = fp32 on the config it is given: its own copy, not the base's.
    lora_cfg = LoraConfig(r=r, lora_alpha=scale * r, lora_dropout=p, megatron_config=config(w.dtype),
                          megatron_core="megatron.core")
    with _lora_bias_defaults_to_false(tp_layer):
        layer = tp_layer.dispatch_megatron(base, ADAPTER, lora_cfg, r=r, lora_alpha=scale * r,
                                           fan_in_fan_out=False)  # defect 1
    if layer is None:
        raise RuntimeError(f"peft's dispatch_megatron did not take the {type(base).__name__}")
    lora_a, lora_b = layer.lora_A[ADAPTER], layer.lora_B[ADAPTER]
    _output_only(lora_b if kind == "column" else lora_a)
    with torch.no_grad():
        lora_a.weight.copy_(a)
        lora_b.weight.copy_(b)
    layer.to(w.device)
    return layer, [base.weight, lora_a.weight, lora_b.weight]
