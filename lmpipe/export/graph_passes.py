"""Rewrites of the exported ONNX graph that ONNX Runtime runs faster, with the same numbers.

At opset 23 torch's exporter writes attention as one ONNX `Attention` node and rotary
positions as `RotaryEmbedding` nodes, which ONNX Runtime runs as fused kernels; at opset 18 the
same model is ~40 elementwise nodes per layer (MatMul, Softmax, Where, IsNaN, Mul, Slice, Neg,
Concat). Two passes make that graph run, and run well:

- `expand_rotary_caches`: ONNX Runtime 1.32's RotaryEmbedding kernel wants cos/sin caches with
  the batch size of its input, and the exporter writes them with batch 1 (shape [1, seq, d/2]:
  the same positions for every row). An `Expand` to the input's batch makes them legal.
- `split_matmuls`: a MatMul by a constant weight whose only reader is a `Split` along the last
  axis (ModernBERT's GeGLU: one 128 x 768 projection split into gate and value) becomes one
  MatMul per part on the matching weight columns: the same products without copying the
  [batch, seq, 768] activation into two halves (9.6% of the fp32 graph's kernel time).

- `attention_3d`: torch exports attention in the 4-D [batch, heads, sequence, head_dim] layout
  of its SDPA call: each of Q, K and V is reshaped to heads and transposed, the output
  transposed back and reshaped (ModernBERT's packed QKV projection is also sliced three ways).
  ONNX `Attention` and `RotaryEmbedding` take [batch, sequence, hidden] directly given their
  head counts, so the pass feeds them the projections themselves (a packed projection becomes
  three MatMuls on its Q, K and V columns) and lets the attention write the [batch, sequence,
  hidden] its output projection reads: 7 Transposes, 6 Slices and Squeezes and 3 Reshapes fewer
  per ModernBERT layer, 4 Transposes and 4 Reshapes fewer per BERT layer.

Measured on the default exported classifier (ModernBERT 2 x 128), CPU seconds per 32-text
batch at 1 thread: opset 18 graph 1.04x torch eager, opset 23 + rotary fix 1.44x, + split
1.58x (process time under load; `make bench` has the wall-clock ratios). `attention_3d` then
made the int8 graph 1.13-1.22x and the fp32 graph 1.0-1.1x faster per 32-text batch (medians
of interleaved runs on a noisy 2-core machine; MiniLM-L6, matmul-bound, 1.01-1.03x). Logits
stay within 2e-6 of torch on the 2,000 test reviews.

Tried and not kept: ONNX Runtime's com.microsoft MultiHeadAttention with a [batch, sequence]
padding mask instead of the standard `Attention` (same logits, no faster, and a contrib op other
runtimes do not have).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

BATCH_ONES = "lmpipe_ones_2"  # the [1, 1] tail of the [batch, 1, 1] Expand shape


def drop_dead_nodes(graph: onnx.GraphProto) -> None:
    """Remove nodes none of whose outputs is read (ONNX ops have no side effects), then unread initializers."""
    while True:
        used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
        live = [node for node in graph.node if any(out in used for out in node.output)]
        if len(live) == len(graph.node):
            break
        del graph.node[:]
        graph.node.extend(live)
    used = {name for node in graph.node for name in node.input}
    kept = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)


def expand_rotary_caches(model: onnx.ModelProto) -> int:
    """Expand every RotaryEmbedding's cos/sin caches to its input's batch; the number rewritten."""
    graph = model.graph
    nodes: list[onnx.NodeProto] = []
    count = 0
    for node in graph.node:
        if node.op_type == "RotaryEmbedding" and node.domain in ("", "ai.onnx") and len(node.input) == 3:
            x = node.input[0]
            batch, shape = f"lmpipe_rotary{count}_batch", f"lmpipe_rotary{count}_shape"
            nodes.append(helper.make_node("Shape", [x], [batch], start=0, end=1, name=f"{batch}_node"))
            nodes.append(helper.make_node("Concat", [batch, BATCH_ONES], [shape], axis=0, name=f"{shape}_node"))
            for j in (1, 2):  # cos_cache, sin_cache
                expanded = f"lmpipe_rotary{count}_cache{j}"
                nodes.append(helper.make_node("Expand", [node.input[j], shape], [expanded], name=f"{expanded}_node"))
                node.input[j] = expanded
            count += 1
        nodes.append(node)
    if count:
        graph.initializer.append(numpy_helper.from_array(np.ones(2, dtype=np.int64), BATCH_ONES))
        del graph.node[:]
        graph.node.extend(nodes)
    return count


# --------------------------------------------------------------------------- graph look-ups
def _attribute(node: onnx.NodeProto, name: str, default: Any = None) -> Any:
    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)


def _scalar(name: str, constants: dict[str, onnx.TensorProto]) -> int | None:
    """The one integer held by constant `name` (a scalar or a 1-element tensor), else None."""
    if name not in constants:
        return None
    values = numpy_helper.to_array(constants[name]).reshape(-1)
    return int(values[0]) if values.size == 1 else None


class _Graph:
    """Look-ups over one graph: producers, readers, constants and the exporter's inferred shapes."""

    def __init__(self, model: onnx.ModelProto) -> None:
        graph = model.graph
        self.constants = {t.name: t for t in graph.initializer}
        self.producer = {out: node for node in graph.node for out in node.output}
        self.readers: dict[str, list[onnx.NodeProto]] = {}
        for node in graph.node:
            for name in node.input:
                self.readers.setdefault(name, []).append(node)
        self.outputs = {o.name for o in graph.output}
        inferred = onnx.shape_inference.infer_shapes(model).graph
        self.shapes = {
            v.name: [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]
            for v in list(inferred.value_info) + list(inferred.input) + list(inferred.output)
        }

    def only_reader(self, name: str) -> onnx.NodeProto | None:
        readers = self.readers.get(name, [])
        return readers[0] if len(readers) == 1 and name not in self.outputs else None

    def made_by(self, name: str, op_type: str) -> onnx.NodeProto | None:
        node = self.producer.get(name)
        return node if node is not None and node.op_type == op_type and node.domain in ("", "ai.onnx") else None


def _split_sizes(split: onnx.NodeProto, width: int, constants: dict[str, onnx.TensorProto]) -> list[int] | None:
    """Output widths of a last-axis Split of a `width`-wide tensor, or None if not constant."""
    if len(split.input) > 1 and split.input[1]:
        sizes = constants.get(split.input[1])
        return None if sizes is None else [int(s) for s in numpy_helper.to_array(sizes)]
    parts = len(split.output)
    return [width // parts] * parts if width % parts == 0 else None


def split_matmuls(model: onnx.ModelProto) -> int:
    """Replace MatMul(x, W) -> Split(last axis) by one MatMul per part; the number rewritten."""
    graph = model.graph
    g = _Graph(model)
    replaced: dict[int, list[onnx.NodeProto]] = {}
    dropped: set[int] = set()
    for split in graph.node:
        matmul = g.made_by(split.input[0], "MatMul") if split.op_type == "Split" else None
        if matmul is None or matmul.input[1] not in g.constants or g.only_reader(split.input[0]) is None:
            continue
        weight = numpy_helper.to_array(g.constants[matmul.input[1]])
        axis = _attribute(split, "axis", 0)
        sizes = _split_sizes(split, weight.shape[-1], g.constants)
        last_axis = axis == -1 or axis == len(g.shapes.get(split.input[0], [])) - 1
        if weight.ndim != 2 or not last_axis or sizes is None or sum(sizes) != weight.shape[-1]:
            continue
        parts, start = [], 0
        for j, (size, out) in enumerate(zip(sizes, split.output)):
            name = f"{matmul.input[1]}_part{j}"
            columns = np.ascontiguousarray(weight[:, start : start + size])
            graph.initializer.append(numpy_helper.from_array(columns, name))
            parts.append(helper.make_node("MatMul", [matmul.input[0], name], [out], name=f"{matmul.name}_part{j}"))
            start += size
        replaced[id(matmul)] = parts
        dropped.add(id(split))
    if replaced:
        nodes = [new for node in graph.node if id(node) not in dropped for new in replaced.get(id(node), [node])]
        del graph.node[:]
        graph.node.extend(nodes)
        drop_dead_nodes(graph)
    return len(replaced)


# --------------------------------------------------------------------------- attention_3d
HEADS_FIRST = [0, 2, 1, 3]  # [batch, sequence, heads, dim] <-> [batch, heads, sequence, dim]


def _packed_part(g: _Graph, squeeze: onnx.NodeProto) -> tuple[onnx.NodeProto, int, int] | None:
    """(MatMul, part, parts) when `squeeze` takes part j of MatMul(x, W) reshaped to [b, s, parts, h, d]."""
    slice_ = g.made_by(squeeze.input[0], "Slice")
    if slice_ is None or len(squeeze.input) < 2 or len(slice_.input) < 4:
        return None
    reshape = g.made_by(slice_.input[0], "Reshape")
    shape = g.shapes.get(slice_.input[0], [])
    matmul = g.made_by(reshape.input[0], "MatMul") if reshape is not None else None
    if matmul is None or len(shape) != 5 or None in shape[2:] or matmul.input[1] not in g.constants:
        return None
    weight_shape = list(g.constants[matmul.input[1]].dims)
    if len(weight_shape) != 2 or weight_shape[1] != shape[2] * shape[3] * shape[4]:
        return None
    start, end = _scalar(slice_.input[1], g.constants), _scalar(slice_.input[2], g.constants)
    axes = [_scalar(n, g.constants) for n in (slice_.input[3], squeeze.input[1])]
    if start is None or start < 0 or end != start + 1 or any(a not in (2, -3) for a in axes):
        return None
    if len(slice_.input) > 4 and _scalar(slice_.input[4], g.constants) not in (None, 1):
        return None
    return matmul, start, shape[2]


def _heads_input(g: _Graph, name: str) -> tuple[tuple, int] | None:
    """Where the 3-D [batch, sequence, heads * dim] tensor behind 4-D input `name` comes from.

    Returns (source, heads): source ("tensor", name) for Transpose(Reshape(x)), or ("part",
    MatMul, j, parts) for Transpose(Squeeze(Slice(Reshape(MatMul)))) of a packed projection.
    """
    transpose = g.made_by(name, "Transpose")
    if transpose is None or list(_attribute(transpose, "perm", [])) != HEADS_FIRST:
        return None
    if g.only_reader(transpose.output[0]) is None:
        return None
    shape = g.shapes.get(transpose.input[0], [])
    if len(shape) != 4 or shape[2] is None or shape[3] is None:
        return None
    reshape = g.made_by(transpose.input[0], "Reshape")
    source = g.shapes.get(reshape.input[0], []) if reshape is not None else []
    if len(source) == 3 and source[2] == shape[2] * shape[3]:  # [b, s, h * d] -> [b, s, h, d]
        return ("tensor", reshape.input[0]), shape[2]
    squeeze = g.made_by(transpose.input[0], "Squeeze")
    part = _packed_part(g, squeeze) if squeeze is not None else None
    return (("part", *part), shape[2]) if part is not None else None


def _plan_attention(g: _Graph, attention: onnx.NodeProto) -> dict | None:
    """What replaces one 4-D attention, or None when its inputs or output do not match."""
    if _attribute(attention, "q_num_heads") is not None or any(attention.output[1:]):
        return None
    inputs: dict[int, dict] = {}
    for slot in (0, 1, 2):
        name, rotary = attention.input[slot], None
        node = g.made_by(name, "RotaryEmbedding")
        if node is not None and slot < 2:
            if g.only_reader(name) is not attention:
                return None
            rotary, name = node, node.input[0]
        found = _heads_input(g, name)
        if found is None:
            return None
        inputs[slot] = {"source": found[0], "heads": found[1], "rotary": rotary}
    transpose = g.only_reader(attention.output[0])
    if transpose is None or transpose.op_type != "Transpose" or list(_attribute(transpose, "perm", [])) != HEADS_FIRST:
        return None
    reshape = g.only_reader(transpose.output[0])
    if reshape is None or reshape.op_type != "Reshape" or len(g.shapes.get(reshape.output[0], [])) != 3:
        return None
    if inputs[1]["heads"] != inputs[2]["heads"]:
        return None
    return {"attention": attention, "inputs": inputs, "replaced": [transpose, reshape], "output": reshape.output[0]}


def _weight_part(graph: onnx.GraphProto, g: _Graph, matmul: onnx.NodeProto, j: int, parts: int) -> str:
    """Initializer holding columns j of `parts` of MatMul's constant weight (added once)."""
    name = f"{matmul.input[1]}_part{j}of{parts}"
    if name not in g.constants:
        weight = numpy_helper.to_array(g.constants[matmul.input[1]])
        width = weight.shape[-1] // parts
        tensor = numpy_helper.from_array(np.ascontiguousarray(weight[:, j * width : (j + 1) * width]), name)
        graph.initializer.append(tensor)
        g.constants[name] = tensor
    return name


def _rewrite(graph: onnx.GraphProto, g: _Graph, plan: dict, projections: dict) -> list[onnx.NodeProto]:
    """New nodes for one planned attention: projections, 3-D rotary, 3-D attention."""
    attention, nodes, names = plan["attention"], [], []
    for slot, spec in plan["inputs"].items():
        source = spec["source"]
        if source[0] == "tensor":
            tensor = source[1]
        else:
            _, matmul, j, parts = source
            key = (id(matmul), j)
            if key not in projections:
                weight = _weight_part(graph, g, matmul, j, parts)
                part = projections[key] = f"{matmul.output[0]}_part{j}"
                nodes.append(helper.make_node("MatMul", [matmul.input[0], weight], [part], name=f"{part}_node"))
            tensor = projections[key]
        rotary = spec["rotary"]
        if rotary is not None:
            rotated = f"{rotary.output[0]}_3d"
            node = helper.make_node("RotaryEmbedding", [tensor, *rotary.input[1:]], [rotated], name=f"{rotated}_node")
            node.attribute.extend(a for a in rotary.attribute if a.name != "num_heads")
            node.attribute.append(helper.make_attribute("num_heads", spec["heads"]))
            nodes.append(node)
            tensor = rotated
        names.append(tensor)
    fused = helper.make_node(
        "Attention", [*names, *attention.input[3:]], [plan["output"]], name=f"{plan['output']}_attention"
    )
    fused.attribute.extend(attention.attribute)
    fused.attribute.append(helper.make_attribute("q_num_heads", plan["inputs"][0]["heads"]))
    fused.attribute.append(helper.make_attribute("kv_num_heads", plan["inputs"][1]["heads"]))
    return nodes + [fused]


def attention_3d(model: onnx.ModelProto) -> int:
    """Run every matching 4-D `Attention` (and its RotaryEmbeddings) on 3-D tensors; the number rewritten."""
    graph = model.graph
    if any(a.HasField("g") or len(a.graphs) for node in graph.node for a in node.attribute):
        return 0  # subgraphs may read outer names: keep the pass to flat graphs
    g = _Graph(model)
    plans = [
        plan
        for node in graph.node
        if node.op_type == "Attention" and node.domain in ("", "ai.onnx")
        for plan in [_plan_attention(g, node)]
        if plan is not None
    ]
    if not plans:
        return 0
    projections: dict = {}
    new_nodes = {id(p["attention"]): _rewrite(graph, g, p, projections) for p in plans}
    removed = {id(n) for p in plans for n in p["replaced"]}
    removed |= {id(s["rotary"]) for p in plans for s in p["inputs"].values() if s["rotary"] is not None}
    nodes = [new for node in graph.node if id(node) not in removed for new in new_nodes.get(id(node), [node])]
    del graph.node[:]
    graph.node.extend(nodes)
    drop_dead_nodes(graph)
    return len(plans)
