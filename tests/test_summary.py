import numpy as np
import optax

import layerfreeze as lf


def _params():
    return {
        "stem": {"kernel": np.zeros((3, 3, 3, 8), np.float32)},
        "stage1": {"kernel": np.zeros((3, 3, 8, 8), np.float32), "scale": np.zeros(8, np.float32)},
        "head": {"kernel": np.zeros((8, 10), np.float32), "bias": np.zeros(10, np.float32)},
    }


def test_counts_and_order():
    s = lf.summary(_params(), "stem,stage1/kernel")
    d = s.as_dict()
    assert list(d["groups"]) == ["stem", "stage1", "head"]
    assert d["groups"]["stem"] == {
        "params": 216,
        "bytes": 864,
        "trainable_params": 0,
        "status": "frozen",
        "opt_state_bytes": None,
    }
    assert d["groups"]["stage1"]["status"] == "partial"
    assert d["groups"]["stage1"]["trainable_params"] == 8
    assert d["total_params"] == 216 + 576 + 8 + 90
    assert d["trainable_params"] == 98
    assert abs(d["trainable_fraction"] - 98 / 890) < 1e-12


def test_opt_state_bytes_and_table():
    params = _params()
    state = lf.freeze(optax.adam(1e-3), "stem,stage1").init(params)
    s = lf.summary(params, "stem,stage1", state)
    assert s.as_dict()["groups"]["head"]["opt_state_bytes"] == 2 * 90 * 4
    assert s.shared_opt_state_bytes == 4  # Adam's int32 step count
    text = str(s)
    assert text.splitlines()[0] == "freeze spec: stem,stage1"
    assert "trainable: 90 of 890 (10.11%), frozen: 800" in text
    assert "(shared)" in text
    head_row = next(line for line in text.splitlines() if line.startswith("head"))
    assert head_row.split() == ["head", "90", "360", "B", "trainable", "720", "B"]
