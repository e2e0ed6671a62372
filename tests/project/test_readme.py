"""README.md's code runs as shown.

Every ```python block runs. A block that needs ranks (it names ``tp_group``, torch.distributed,
megatron, or what wraps Megatron layers: see ``NEEDS_RANKS``) runs at TP=2 in the session's gloo
pool (tests/support/harness.py): each of ranks 0 and 1 executes it in a fresh namespace that holds
``tp_group``, their TP=2 process group. Such a block takes its group from ``tp_group``, never
from ``dist.group.WORLD`` (the pool's world has 4 ranks, so a collective on it would hang until
the timeout). Other blocks run as they are, in this process. Blocks that are an example file's
``readme`` region are skipped here: tests/integration/test_peft.py and
tests/modules/test_megatron_conventions.py check them verbatim against examples/ and run them. A
failure names the block by its first line and its line in README.md.

The README's commands for the examples run too, one launch mode per example (spawned ranks for
one, torchrun for the other; both go through ``tplora_kernels.testing.launch.run_script``), and
must print the result on rank 0 with no warnings before it.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
NEEDS_RANKS = re.compile(r"\btp_group\b|torch\.distributed|\bdist\.|megatron|ParallelLoRA|apply_lora|"
                         r"sum_sequence_parallel_grads|save_adapter|load_adapter")
_START, _END = "# --8<-- [start:readme]\n", "# --8<-- [end:readme]\n"


def _regions() -> set[str]:
    """The ``readme`` regions of examples/*.py: README blocks checked and run by other tests."""
    out = set()
    for path in sorted((ROOT / "examples").glob("*.py")):
        text = path.read_text()
        if _START in text:
            out.add(text.split(_START, 1)[1].split(_END, 1)[0].strip("\n"))
    return out


def _blocks() -> list[tuple[int, str]]:
    """``(line, code)`` of every ```python block of README.md, ``line`` being its first code line."""
    text = README.read_text()
    return [(text.count("\n", 0, m.start(1)) + 1, m.group(1))
            for m in re.finditer(r"^```python\n(.*?)^```", text, flags=re.S | re.M)]


def _first_line(code: str) -> str:
    return next((ln.strip() for ln in code.splitlines() if ln.strip()), "")


BLOCKS = [(line, code) for line, code in _blocks() if code.strip("\n") not in _regions()]


def exec_block(ctx, code: str, origin: str) -> bool:
    """On a pool rank: run one README block with this rank's TP group as ``tp_group``."""
    exec(compile(code, origin, "exec"), {"__name__": "__readme__", "tp_group": ctx.group})
    return True


def test_readme_has_blocks_to_run():
    """README has python blocks, and some are an example's readme region."""
    assert _blocks(), "no ```python block found in README.md"
    assert len(BLOCKS) < len(_blocks()), "no README block matched an example's readme region (markers moved?)"


@pytest.mark.parametrize("line, code", BLOCKS, ids=[f"line{line}" for line, _ in BLOCKS])
def test_readme_block_runs(line, code, request):
    """Each README python block runs as shown (at TP=2 in the pool when it needs ranks)."""
    origin = f"README.md:{line}"
    what = f"README block at line {line} starting {_first_line(code)!r}"
    if NEEDS_RANKS.search(code):
        pool = request.getfixturevalue("dist_pool")
        results = pool.run(exec_block, 2, raise_errors=False, timeout=120, code=code, origin=origin)
        errors = [r for r in results if r is not True]
        if errors:
            pool.restart()  # a rank that raised may have left the other inside a collective
        assert not errors, f"{what} failed at TP=2:\n" + "\n".join(map(str, errors))
        return
    try:
        exec(compile(code, origin, "exec"), {"__name__": "__readme__"})
    except Exception as e:
        raise AssertionError(f"{what} failed: {type(e).__name__}: {e}") from e


def _example_commands() -> dict[str, list[str]]:
    """README's run commands per example: ``{"examples/x.py": ["python examples/x.py", "torchrun ..."]}``."""
    out: dict[str, list[str]] = {}
    for cmd in re.findall(r"`((?:python|torchrun)[^`]*?(examples/\w+\.py))`", README.read_text()):
        out.setdefault(cmd[1], []).append(cmd[0])
    return out


def _launch(cmd: str) -> list[str]:
    """A README command as argv: this interpreter for ``python``, torch's launcher for ``torchrun``."""
    words = cmd.split()
    head = [sys.executable] if words[0] == "python" else [sys.executable, "-m", "torch.distributed.run"]
    return head + words[1:]


_RESULT = {"examples/megatron_example.py": "adapted ['linear_fc1', 'linear_fc2']; losses [",
           "examples/peft_example.py": "losses [",
           "examples/pipeline_example.py": "TP2 x PP2: loss "}
# The pipeline example's numbers: the loss must fall, and PEFT on the Hugging Face model must give
# Megatron's logits (fp32 on both sides, computed in another order).
_PIPELINE = re.compile(r"loss (?P<first>[\d.]+) -> (?P<last>[\d.]+) over \d+ steps; HF\+PEFT logits vs Megatron: "
                       r"max \|diff\| (?P<diff>[\d.e+-]+) \(of (?P<scale>[\d.]+)\)")


def _picked() -> list[str]:
    """One README command per example, alternating the launch mode so both are covered."""
    picked = []
    for i, (_path, cmds) in enumerate(sorted(_example_commands().items())):
        want = "torchrun" if i % 2 else "python"
        picked.append(next((c for c in cmds if c.startswith(want)), cmds[0]))
    return picked


def test_readme_names_both_launches_for_every_example():
    """README gives both launch commands (python and torchrun) for every example."""
    cmds = _example_commands()
    assert set(cmds) == set(_RESULT), f"README's example commands name {sorted(cmds)}, expected {sorted(_RESULT)}"
    for path, found in cmds.items():
        kinds = sorted({c.split()[0] for c in found})
        assert kinds == ["python", "torchrun"], f"{path}: README gives {found}"


def _run_in_own_group(argv: list[str], env: dict, timeout: float) -> subprocess.CompletedProcess:
    """Run ``argv`` in a new process group, killed whole on timeout: the example's own ranks too
    (``subprocess.run`` kills only its direct child, and the spawned ranks would outlive the suite)."""
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"`{' '.join(argv)}` ran past {timeout:g}s (killed with its ranks):\n{out[-2000:]}\n{err[-3000:]}")
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


@pytest.mark.parametrize("cmd", _picked())
def test_example_prints_its_result_without_warnings(cmd):
    """An example run as README says prints one result line on rank 0 and no warning."""
    # The user's environment, not the suite's: conftest sets TRITON_INTERPRET=1 for the kernel tests,
    # and with it the package's auto backend runs the Triton interpreter (the pipeline example then
    # takes minutes instead of tens of seconds).
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = _run_in_own_group(_launch(cmd), env, timeout=240)
    assert proc.returncode == 0, f"`{cmd}` failed (rc {proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    path = cmd.split()[-1]
    lines = proc.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith(_RESULT[path]), \
        f"`{cmd}`: expected one result line from rank 0 starting {_RESULT[path]!r}, stdout {proc.stdout!r}"
    warned = [ln for ln in proc.stderr.splitlines() if "Warning" in ln or "warnings.warn" in ln]
    assert not warned, f"`{cmd}`: {len(warned)} warning lines on stderr, e.g. {warned[:2]}"
    if path == "examples/pipeline_example.py":
        m = _PIPELINE.search(lines[0])
        assert m, f"`{cmd}`: the result line does not give the loss and the logit difference: {lines[0]!r}"
        first, last, diff, scale = (float(m[k]) for k in ("first", "last", "diff", "scale"))
        assert last < 0.8 * first, f"`{cmd}`: the loss did not fall enough: {first} -> {last}"
        assert diff <= 1e-5 * scale, f"`{cmd}`: HF+PEFT logits differ from Megatron's by {diff} (of {scale})"
