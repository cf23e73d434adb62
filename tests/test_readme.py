"""The README's commands and every one of its Python blocks, each run alone as written."""

import pathlib
import re
import textwrap

import fresh
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
BLOCKS = re.findall(r"```python\n(.*?)\n```", README, re.S)

# What a block must leave true, run after it in the same interpreter; keyed by a
# line only that block has. Blocks without an entry must run without error.
CHECKS = {
    'steps = train.make_steps(model, optax.adamw(1e-3), "conv1,bn1"': """
        import numpy as np
        for group in ("conv1", "bn1"):
            for a, b in zip(jax.tree.leaves(variables["params"][group]),
                            jax.tree.leaves(state.params[group]), strict=True):
                np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(variables["batch_stats"]["bn1"]["mean"],
                                      state.batch_stats["bn1"]["mean"])
        assert not np.array_equal(variables["params"]["head"]["kernel"],
                                  state.params["head"]["kernel"])
    """,
    "grad_fn = lf.value_and_grad(loss_fn, spec, has_aux=True)": """
        import numpy as np
        np.testing.assert_array_equal(variables["params"]["conv1"]["kernel"],
                                      params["conv1"]["kernel"])
        np.testing.assert_array_equal(variables["batch_stats"]["bn1"]["var"],
                                      batch_stats["bn1"]["var"])
        assert not np.array_equal(variables["batch_stats"]["bn2"]["var"], batch_stats["bn2"]["var"])
        assert float(grad_norm) > 0
    """,
    "net = Net(nnx.Rngs(0))": """
        import numpy as np
        assert float(loss) > 0
        np.testing.assert_array_equal(net.bn1.mean[...], np.zeros(16))
        assert nnx.state(net, nnx.Param)["head"]["kernel"][...].shape == (16, 10)
    """,
    "phases = train.Phases(": """
        assert checkpoint_metadata["phase"] == 4
        assert phases.compilations == 5
    """,
    "mesh = train.make_mesh()": """
        import numpy as np
        for a, b in zip(jax.tree.leaves(variables["params"]["stage2"]),
                        jax.tree.leaves(state.params["stage2"]), strict=True):
            np.testing.assert_array_equal(a, b)
        assert np.isfinite(float(metrics["loss"]))
    """,
    '(".*", sharding.fsdp(min_size=2**14)),': """
        import numpy as np
        from jax.sharding import PartitionSpec as P
        specs = jax.tree.map(lambda x: x.sharding.spec, state.params)
        assert specs["body"]["kernel"] == P(None, "fsdp")
        assert specs["head"]["kernel"] == P("fsdp", None)
        assert specs["stem"]["bias"] == P()
        adam = state.opt_state.inner_states["trainable"].inner_state[0].inner_state[0]
        assert adam.mu["body"]["kernel"].sharding.spec == P(None, "fsdp")
        assert not jax.tree.leaves(adam.mu["stem"])  # frozen: no optimizer state
        np.testing.assert_array_equal(state.params["stem"]["kernel"],
                                      variables["params"]["stem"]["kernel"])
        assert np.isfinite(float(metrics["loss"]))
    """,
    'features = Trunk(name="trunk")(x)': """
        import numpy as np
        initial = jax.jit(model.init)(jax.random.key(1), x[:1])["params"]
        for a, b in zip(jax.tree.leaves(initial["trunk"]), jax.tree.leaves(params["trunk"]),
                        strict=True):
            np.testing.assert_array_equal(a, b)
        for head in ("head_a", "head_b"):
            assert not np.array_equal(initial[head]["kernel"], params[head]["kernel"])
        assert float(metrics["loss_a"]) < 1.0 and float(metrics["loss_b"]) < 0.2
    """,
    'spec = "teacher,student/layer0"': """
        import numpy as np
        teacher_init = jax.jit(teacher.init)(jax.random.key(1), x[:1])["params"]
        student_init = jax.jit(student.init)(jax.random.key(2), x[:1])["params"]
        for a, b in zip(jax.tree.leaves((teacher_init, student_init["layer0"])),
                        jax.tree.leaves((params["teacher"], params["student"]["layer0"])),
                        strict=True):
            np.testing.assert_array_equal(a, b)
        head = params["student"]["head"]["kernel"]
        assert not np.array_equal(student_init["head"]["kernel"], head)
        assert float(metrics["soft"]) < 0.1
    """,
    "variables, reinit = pretrained.merge_pretrained(": """
        assert reinit == ("head",)
        assert not variables["params"]["Transformer"]["encoderblock"]["MlpBlock_3"][
            "Dense_0"]["kernel"].any()  # the stand-in's zeros were loaded
    """,
}


def _check_for(block):
    found = [code for marker, code in CHECKS.items() if marker in block]
    assert len(found) <= 1, "a check's marker matches two blocks"
    return textwrap.dedent(found[0]) if found else ""


def test_ci_runs_exactly_the_readme_test_command():
    commands = re.findall(r"```bash\n(.*?)\n```", README, re.S)
    assert "experiments/cifar.py --freeze=stage1,stage2" in commands[0]
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()
    assert ci[-1] == commands[1]


def test_every_check_finds_its_block():
    for marker in CHECKS:
        assert sum(marker in block for block in BLOCKS) == 1, marker


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_python_block_runs_alone_in_a_fresh_interpreter(index, tmp_path):
    block = BLOCKS[index]
    proc = fresh.run_code(
        block + "\n" + _check_for(block),
        cwd=tmp_path,  # files a block writes stay there
        # As in conftest: non-partitionable threefry compiles the initialisers 2-3x
        # faster on CPU; only random values change, and no block shows one.
        jax_config={"jax_threefry_partitionable": False},
    )
    assert proc.returncode == 0, f"README block {index}:\n{block}\n---\n{proc.stderr[-3000:]}"
    after = README.split(f"```python\n{block}\n```", 1)[1]
    shown = re.match(r"\s*```text\n(.*?)\n```", after, re.S)
    if shown:  # the output the README shows right after the block
        assert proc.stdout.strip() == shown.group(1).strip()
    if "phases = train.Phases(" in block:
        changes = [line.split(":")[0] for line in proc.stdout.strip().splitlines()]
        assert changes == ["step 2", "step 4", "step 6", "step 8"]
