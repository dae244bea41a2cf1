"""Per-token int8 (encoder.runtime onnx-int8): a quantized MatMul stays close to the float one,
and a row's result does not depend on the other rows of its batch (what made ONNX Runtime's
quantize_dynamic unusable for routing)."""
from __future__ import annotations

import numpy as np
import pytest

from encoders.quantize import quantize_per_token

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


def _model(path, W):
    from onnx import TensorProto, helper, numpy_helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "tokens", W.shape[0]])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "tokens", W.shape[1]])
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Relu", ["h"], ["y"])],
                              "g", [x], [y], [numpy_helper.from_array(W, "W")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def test_per_token_int8_is_close_to_float_and_independent_of_the_batch(tmp_path):
    rng = np.random.default_rng(0)
    W = rng.normal(size=(64, 48)).astype(np.float32)
    _model(tmp_path / "f.onnx", W)
    assert quantize_per_token(tmp_path / "f.onnx", tmp_path / "q.onnx") == 1
    sess = ort.InferenceSession(str(tmp_path / "q.onnx"), providers=["CPUExecutionProvider"])
    X = rng.normal(size=(3, 5, 64)).astype(np.float32)
    X[2] *= 100.0                                     # a row of another scale beside the others
    (got,) = sess.run(None, {"x": X})
    want = np.maximum(X @ W, 0)
    assert got.shape == want.shape == (3, 5, 48)
    # within 4% of each row's range, 3.5 sigma of 7-bit weights' rounding (8-bit weights, saturating on AVX2, were 15% off)
    scale = np.abs(X @ W).max(axis=-1, keepdims=True)
    assert (np.abs(got - want) <= 0.04 * scale).all()
    for i in range(3):                                # each prompt alone: the same numbers
        (alone,) = sess.run(None, {"x": X[i:i + 1]})
        np.testing.assert_allclose(alone[0], got[i], rtol=1e-6, atol=1e-6)
