"""Use with Megatron: fused tensor-parallel LoRA with sequence parallelism, without PEFT.

Run it on CPU (spawns two gloo ranks):   python examples/megatron_example.py
or under torchrun:                        torchrun --nproc-per-node 2 examples/megatron_example.py
Rank 0 prints the losses.

The part between the ``readme`` markers is the README's "Use with Megatron" example; a test
runs ``main`` at TP=2 and checks that the README shows exactly that code.
"""

from __future__ import annotations

import warnings

# megatron-core warns at import, in every process, that Transformer Engine and Apex (GPU fusions)
# are absent; nothing here uses them, and the lines would bury the result.
warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed", category=UserWarning)

# --8<-- [start:readme]
import tempfile

import torch
import torch.distributed as dist
from megatron.core import ModelParallelConfig
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from torch import nn

import tplora_kernels


class MLP(nn.Module):
    """A Megatron MLP with sequence parallelism: x arrives as this rank's [seq/t, batch, hidden]."""

    def __init__(self, tp_group, hidden: int = 64, ffn: int = 128) -> None:
        super().__init__()
        cfg = ModelParallelConfig(tensor_model_parallel_size=tp_group.size(), sequence_parallel=True,
                                  use_cpu_initialization=True, params_dtype=torch.float32)
        init = nn.init.xavier_normal_
        self.linear_fc1 = ColumnParallelLinear(hidden, ffn, config=cfg, init_method=init, bias=True,
                                               gather_output=False, tp_group=tp_group)
        self.linear_fc2 = RowParallelLinear(ffn, hidden, config=cfg, init_method=init, bias=True,
                                            input_is_parallel=True, skip_bias_add=False, tp_group=tp_group)

    def forward(self, x):
        h, _ = self.linear_fc1(x)  # our module all-gathers the sequence, as Megatron's would
        y, _ = self.linear_fc2(nn.functional.gelu(h))  # ... and reduce-scatters it back
        return y


def main(tp_group=None, out_dir: str | None = None) -> dict:
    tp_group = tp_group or dist.group.WORLD
    t, rank = tp_group.size(), tp_group.rank()
    torch.manual_seed(0)  # alike on every TP rank, as Megatron seeds it
    model = MLP(tp_group)

    # Wrap the targeted parallel linears in place; the base weights are frozen.
    config = tplora_kernels.LoRAConfig(r=8, lora_alpha=16, lora_dropout=0.05, rank_pattern={"linear_fc2": 4},
                                       target_modules=["linear_fc1", "linear_fc2"])
    adapted = tplora_kernels.apply_lora(model, config)

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x_full = torch.randn(16, 4, 64, generator=torch.Generator().manual_seed(1))  # [seq, batch, hidden]
    x = x_full.chunk(t, dim=0)[rank]  # this rank's sequence slice
    losses = []
    for _ in range(5):
        loss = model(x).square().sum()
        loss.backward()
        # Under SP each rank's gradient of the replicated factor covers its own rows: sum them.
        # (Megatron's finalize_model_grads does this for parameters marked sequence_parallel.)
        tplora_kernels.sum_sequence_parallel_grads(model.parameters(), tp_group)
        opt.step()
        opt.zero_grad()
        total = torch.tensor([loss.item()])
        dist.all_reduce(total, group=tp_group)
        losses.append(total.item())

    # Megatron dist_checkpointing: the base keeps its own keys, the factors shard like the weight.
    sharded = model.linear_fc1.sharded_state_dict(prefix="linear_fc1.")  # -> dist_checkpointing.save(...)
    # A PEFT-format copy with full A and B (loads onto a dense nn.Linear model, or at any TP size).
    out_dir = out_dir or tempfile.mkdtemp()
    tplora_kernels.save_adapter(model, out_dir, group=tp_group)  # every rank that calls it: here, the job
    return {"adapted": adapted, "losses": losses, "sharded_keys": sorted(sharded), "out_dir": out_dir,
            "sp_marked": [n for n, p in model.named_parameters() if getattr(p, "sequence_parallel", False)]}
# --8<-- [end:readme]


def _report(res: dict) -> str:
    return (f"adapted {res['adapted']}; losses {[round(v, 3) for v in res['losses']]}; "
            f"adapter saved to {res['out_dir']}")


if __name__ == "__main__":
    from tplora_kernels.testing.launch import run_script  # two gloo ranks here, or torchrun's

    run_script(main, _report)
