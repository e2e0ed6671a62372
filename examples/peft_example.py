"""Use with PEFT: fused tensor-parallel LoRA through ``get_peft_model`` on a Megatron model.

Run it on CPU (spawns two gloo ranks):   python examples/peft_example.py
or under torchrun:                        torchrun --nproc-per-node 2 examples/peft_example.py
Needs PEFT: the ``[peft]`` extra (``[bench]`` and ``[test]`` carry it too). Rank 0 prints the losses.

The part between the ``readme`` markers is the README's "Use with PEFT" example; a test runs
``main`` at TP=2 and checks that the README shows exactly that code.
"""

from __future__ import annotations

import importlib.util
import sys
import warnings

# megatron-core warns at import, in every process, that Transformer Engine and Apex (GPU fusions)
# are absent; nothing here uses them, and the lines would bury the result.
warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed", category=UserWarning)
if importlib.util.find_spec("peft") is None:  # say which extra, rather than fail on the import below
    sys.exit("examples/peft_example.py needs PEFT: pip install -e \".[peft]\" (the [bench] and [test] extras "
             "include it too)")

# --8<-- [start:readme]
import tempfile

import torch
import torch.distributed as dist
from megatron.core import ModelParallelConfig
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
from torch import nn

import tplora_kernels
import tplora_kernels.peft


class MLP(nn.Module):
    """A Megatron MLP: fc1 column-parallel, fc2 row-parallel (hidden 64, ffn 128)."""

    def __init__(self, tp_group, hidden: int = 64, ffn: int = 128) -> None:
        super().__init__()
        cfg = ModelParallelConfig(tensor_model_parallel_size=tp_group.size(), use_cpu_initialization=True,
                                  params_dtype=torch.float32)
        init = nn.init.xavier_normal_
        self.fc1 = ColumnParallelLinear(hidden, ffn, config=cfg, init_method=init, bias=True, gather_output=False,
                                        tp_group=tp_group)
        self.fc2 = RowParallelLinear(ffn, hidden, config=cfg, init_method=init, bias=True, input_is_parallel=True,
                                     skip_bias_add=False, tp_group=tp_group)

    def forward(self, x):
        h, _ = self.fc1(x)
        y, _ = self.fc2(nn.functional.gelu(h))
        return y


def main(tp_group=None, out_dir: str | None = None) -> dict:
    tp_group = tp_group or dist.group.WORLD
    torch.manual_seed(0)  # alike on every TP rank, as Megatron seeds it
    model = MLP(tp_group)

    # The one extra call: PEFT now builds our fused modules for Megatron's parallel linears.
    config = tplora_kernels.peft.register(
        LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=["fc1", "fc2"]))
    model = get_peft_model(model, config)

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x = torch.randn(16, 4, 64, generator=torch.Generator().manual_seed(1))  # [seq, batch, hidden]
    losses = []
    for _ in range(5):
        loss = model(x).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())

    keys = sorted(get_peft_model_state_dict(model))  # PEFT's layout: base_model.model.fc1.lora_A.weight, ...
    out_dir = out_dir or tempfile.mkdtemp()
    # Full A and B in PEFT's format, written once; every rank that calls it (here the job) waits for it.
    tplora_kernels.save_adapter(model, out_dir, group=tp_group)

    model.eval()
    with torch.no_grad():
        y = model(x)
        with model.disable_adapter():
            y_base = model(x)
        merged = model.merge_and_unload()  # plain Megatron layers with the adapter folded in
        y_merged = merged(x)
    return {"losses": losses, "keys": keys, "out_dir": out_dir,
            "adapter_effect": (y - y_base).abs().max().item(), "merge_err": (y - y_merged).abs().max().item()}
# --8<-- [end:readme]


def _report(res: dict) -> str:
    return (f"losses {[round(v, 4) for v in res['losses']]}; merge error {res['merge_err']:.1e}; "
            f"adapter saved to {res['out_dir']}")


if __name__ == "__main__":
    from tplora_kernels.testing.launch import run_script  # two gloo ranks here, or torchrun's

    run_script(main, _report)
