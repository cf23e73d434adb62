"""The README's commands and its first example stay true."""

import contextlib
import io
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_ci_runs_exactly_the_readme_test_command():
    commands = re.findall(r"```bash\n(.*?)\n```", README, re.S)
    assert len(commands) >= 2
    assert "experiments/cifar.py --freeze=stage1,stage2" in commands[0]
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()
    assert ci[-1] == commands[1]


def test_first_example_prints_the_summary_shown():
    code = re.search(r"```python\n(.*?)\n```", README, re.S).group(1)
    shown = re.search(r"```text\n(.*?)\n```", README, re.S).group(1)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "README.md", "exec"), {})
    assert out.getvalue().strip() == shown.strip()


def _own_model_namespace():
    section = README.split("## Your own model", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)\n```", section, re.S)
    assert len(blocks) == 3
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, "README.md", "exec"), namespace)
    return namespace


def test_own_model_examples_run_and_keep_frozen_parts_fixed():
    import jax
    import numpy as np
    from flax import nnx

    ns = _own_model_namespace()
    before, state = ns["variables"], ns["state"]
    for group in ("conv1", "bn1"):
        for a, b in zip(
            jax.tree.leaves(before["params"][group]),
            jax.tree.leaves(state.params[group]),
            strict=True,
        ):
            np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(
        before["batch_stats"]["bn1"]["mean"], state.batch_stats["bn1"]["mean"]
    )
    assert not np.array_equal(before["params"]["head"]["kernel"], state.params["head"]["kernel"])
    # The hand-written loop: the same guarantees.
    np.testing.assert_array_equal(
        before["params"]["conv1"]["kernel"], ns["params"]["conv1"]["kernel"]
    )
    np.testing.assert_array_equal(
        before["batch_stats"]["bn1"]["var"], ns["batch_stats"]["bn1"]["var"]
    )
    assert float(ns["grad_norm"]) > 0
    # NNX: bn1's statistics stayed, the head moved.
    net = ns["net"]
    assert float(ns["loss"]) > 0
    np.testing.assert_array_equal(net.bn1.mean[...], np.zeros(16))
    assert nnx.state(net, nnx.Param)["head"]["kernel"][...].shape == (16, 10)


def test_phases_example_runs_and_unfreezes(capsys):
    section = README.split("## Gradual unfreezing", 1)[1].split("\n## ", 1)[0]
    (code,) = re.findall(r"```python\n(.*?)\n```", section, re.S)[1:]
    namespace = _own_model_namespace()
    capsys.readouterr()
    exec(compile(code, "README.md", "exec"), namespace)
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split(":")[0] for line in lines] == ["step 2", "step 4", "step 6", "step 8"]
    assert namespace["checkpoint_metadata"]["phase"] == 4
    assert namespace["phases"].compilations == 5
