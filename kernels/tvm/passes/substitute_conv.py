"""substitute-conv: fp32 2-D convolutions with a constant weight as the direct convolution kernels
(``kernels.tvm.tir.conv2d``), by pattern, on the Relax graph right after ONNX import.

``conv2d(x, W) [+ b] [relu]`` (NCHW / OIHW, float32, static shapes; the bias a constant of C values, as is
or through ``reshape`` to (1, C, 1, 1) as the ONNX importer writes it) becomes one ``call_tir``:
groups = 1 the register-tiled kernel (the weight re-laid out at compile time into a new constant),
groups = C_in = C_out the depthwise kernel. Grouped convolutions with 1 < groups < C (and depthwise ones
with a channel multiplier) stay with the generic lowering, which "auto" tuning covers. Only the end of
each conv [+ add] [+ relu] chain is rewritten; the absorbed bindings are dead code afterwards.

A conv whose input is a Conv-KAN expansion of a raw tensor (SiLU channels + Gaussian RBFs of the BatchNorm-ed
channels, ``match_rbf_input``) reads the raw tensor instead: the kernel computes the expanded channels in its
padded copy (conv2d.RbfInput), so the expansion is neither a separate kernel nor a tensor in memory (Conv-KAN
whole net 39.5 -> 32.4 us, interleaved p50). A 2x2 stride-2 max pool that is a conv's only use goes into the
conv kernel's epilogue (``match_max_pool_2x2``, conv2d.pool_fits). Consecutive groups-1 layers, the later one
reading only the earlier one's (pooled) output, run as one kernel call (conv2d.conv_chain_kernel; Conv-KAN's two
layers: 26.7 -> 26.0 us whole net).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np

from kernels.tvm.passes._rewrite import (
    DROP_BINDING,
    RewritePass,
    _module_pass_class,
    bindings_and_uses,
    const_array,
    const_ints,
    rewrite_bindings,
    static_shape,
)
from kernels.tvm.tir.conv2d import (
    DEPTHWISE_KERNEL_NAME,
    KERNEL_NAME,
    ConvParams,
    RbfInput,
    bias_size,
    choose_block_oc,
    choose_tile_ow,
    columns_fit,
    conv2d_columns_kernel,
    conv2d_kernel,
    conv_chain_kernel,
    depthwise_kernel,
    pack_conv_weight,
    pool_fits,
    prefetch_fits,
    rbf_coefficients,
    tile_ow_for_block,
)
from kernels.tvm.tir.pool import KERNEL_NAME as POOL_KERNEL_NAME
from kernels.tvm.tir.pool import PoolParams, max_pool_blocked_kernel

# A matched layer: (x, W, bias or None, relu, the conv2d's attributes, the residual tensor or None).
# A matched max pool: (input, kh, kw, (stride h, stride w), (pad top, left, bottom, right)).
PoolMatch = tuple[Any, int, int, tuple[int, int], tuple[int, int, int, int]]
Conv = tuple[Any, np.ndarray, "np.ndarray | None", bool, Any, Any]
# A conv input computed from a raw tensor by a Conv-KAN expansion: (raw tensor, the expansion, coef[2, C * K]).
RbfMatch = tuple[Any, RbfInput, np.ndarray]


def _bias_of(e: Any, inner: Any, oc: int) -> np.ndarray | None:
    """The C bias values of an add operand: a constant of C elements laid out along the channel axis, as is
    or through ``reshape``."""
    import tvm
    from tvm import relax

    arr = const_array(e)
    if arr is None:
        node = inner(e)
        if not (isinstance(node, relax.Call) and node.op == tvm.ir.Op.get("relax.reshape")):
            return None
        arr = const_array(node.args[0])
        shape = static_shape(node)
        if arr is None or shape is None or arr.dtype != np.float32 or arr.size != oc:
            return None
        arr = arr.reshape(shape)
    if arr.dtype != np.float32 or arr.size != oc:
        return None
    if oc == 1:
        return arr.reshape(1)
    # (C,), (C, 1, 1) or (1, C, 1, 1): broadcasting against (N, C, H, W) puts the values on channels.
    if arr.ndim >= 3 and arr.ndim <= 4 and arr.shape[-3] == oc and all(d == 1 for d in arr.shape[-2:]):
        return arr.reshape(oc)
    return None  # e.g. (C,), which broadcasts along W, not C


def match_conv(call: Any, bound: dict[Any, Any], uses: dict[Any, int], absorbed: list[Any]) -> Conv | None:
    """(x, W, b, relu, attrs, residual) when ``call`` ends a conv2d [+ bias] [+ residual] [+ relu] chain with a
    constant fp32 weight the kernels cover (groups 1 or depthwise); the inner bindings it swallows go to
    ``absorbed``. The residual is a tensor of the conv's output shape added before the relu (a ResNet block's
    skip connection), read by the kernel's epilogue."""
    import tvm
    from tvm import relax

    op_conv = tvm.ir.Op.get("relax.nn.conv2d")
    op_add = tvm.ir.Op.get("relax.add")
    op_relu = tvm.ir.Op.get("relax.nn.relu")

    def peek(e: Any) -> Any:
        # Only look through a binding used once: otherwise its value is still needed elsewhere.
        return bound[e] if isinstance(e, relax.Var) and uses.get(e, 0) == 1 and e in bound else None

    def conv_bias(node: Any) -> tuple[Any, np.ndarray | None, list[Any]] | None:
        """(conv call, bias, bindings it absorbs) for ``node`` = conv(...) or conv(...) + bias."""
        if not isinstance(node, relax.Call):
            return None
        if node.op == op_conv:
            return node, None, []
        if node.op != op_add:
            return None
        for a, c in (node.args, node.args[::-1]):
            conv = peek(a)
            w = const_array(conv.args[1]) if isinstance(conv, relax.Call) and conv.op == op_conv else None
            bias = _bias_of(c, peek, w.shape[0]) if w is not None and w.ndim == 4 else None
            if bias is not None:
                return conv, bias, [a, *([c] if isinstance(c, relax.Var) else [])]
        return None

    if not isinstance(call, relax.Call):
        return None
    relu = call.op == op_relu
    node = peek(call.args[0]) if relu else call
    swallowed = [call.args[0]] if relu else []
    residual = None
    found = conv_bias(node)
    if found is None and isinstance(node, relax.Call) and node.op == op_add:
        # (conv [+ bias]) + a tensor of the conv's shape: the residual, added in the kernel's epilogue
        for a, c in (node.args, node.args[::-1]):
            inner = conv_bias(peek(a))
            if (inner is not None and isinstance(c, relax.Var) and static_shape(c) == static_shape(node)
                    and str(c.ty.dtype) == "float32"):
                found, residual = (inner[0], inner[1], [a, *inner[2]]), c
                break
    if found is None:
        return None
    conv, bias, inner_vars = found
    x, w = conv.args
    wa = const_array(w)
    xs = static_shape(x)
    at = conv.attrs
    if wa is None or wa.ndim != 4 or wa.dtype != np.float32 or xs is None or len(xs) != 4:
        return None
    if str(x.ty.dtype) != "float32" or (at.out_dtype is not None and str(at.out_dtype) not in ("", "float32")):
        return None
    if (str(at.data_layout), str(at.kernel_layout), str(at.out_layout)) != ("NCHW", "OIHW", "NCHW"):
        return None
    groups, oc, ic = int(at.groups), wa.shape[0], xs[1]
    depthwise = groups == ic == oc and groups > 1 and wa.shape[1] == 1
    if not (groups == 1 and wa.shape[1] == ic) and not depthwise:
        return None
    if residual is not None and (depthwise or static_shape(residual) != static_shape(conv)):
        return None
    absorbed += [*swallowed, *inner_vars]
    return x, wa, bias, relu, at, residual



def match_rbf_input(x: Any, bound: dict[Any, Any]) -> RbfMatch | None:
    """(raw input, expansion, coef[2, C * K]) when the conv input ``x`` is a Conv-KAN expansion of a raw tensor r
    of C channels: ``concat([r * sigmoid(r), reshape(permute_dims(exp(-(((expand_dims(batch_norm(r)[0], 4) -
    centers) * s) ** 2)), [0, 1, 4, 2, 3]), (N, C * K, H, W))], axis=1)`` (as ONNX imports
    toolchain.zoo.convkan's KANConv2d), with the BatchNorm's statistics, the K centers and s constants. The kernel
    then computes those channels in its padded copy (conv2d.RbfInput, coefficients from conv2d.rbf_coefficients)."""
    import tvm
    from tvm import relax

    def call(e: Any, name: str) -> Any:
        v = bound.get(e) if isinstance(e, relax.Var) else e
        return v if isinstance(v, relax.Call) and v.op == tvm.ir.Op.get(name) else None

    def scalar(e: Any) -> float | None:
        a = const_array(e)
        return float(a.reshape(-1)[0]) if a is not None and a.size == 1 and a.dtype == np.float32 else None

    cat = call(x, "relax.concat")
    if cat is None or int(cat.attrs.axis) != 1:
        return None
    parts = bound.get(cat.args[0], cat.args[0]) if isinstance(cat.args[0], relax.Var) else cat.args[0]
    if not isinstance(parts, relax.Tuple) or len(parts.fields) != 2:
        return None
    silu, expanded = parts.fields
    mul = call(silu, "relax.multiply")
    raw = None
    for a, b in (mul.args, mul.args[::-1]) if mul is not None else ():
        sig = call(b, "relax.sigmoid")
        if sig is not None and sig.args[0].same_as(a):
            raw = a
    rs = static_shape(raw) if raw is not None else None
    if rs is None or len(rs) != 4 or str(raw.ty.dtype) != "float32":
        return None
    bn_input = raw
    source = call(raw, "relax.reshape")
    if source is not None and static_shape(source.args[0]) == rs:
        raw = source.args[0]  # a reshape to the same shape (the exported net's input view): read its source
    perm = call(getattr(call(expanded, "relax.reshape"), "args", [None])[0], "relax.permute_dims")
    if perm is None or const_ints(perm.attrs.axes) != [0, 1, 4, 2, 3]:
        return None
    neg = call(getattr(call(perm.args[0], "relax.exp"), "args", [None])[0], "relax.negative")
    sq = call(neg.args[0], "relax.multiply") if neg is not None else None
    if sq is None or not sq.args[0].same_as(sq.args[1]):
        return None
    scaled = call(sq.args[0], "relax.multiply")
    if scaled is None:
        return None
    width = scalar(scaled.args[1])
    sub_e = scaled.args[0]
    if width is None:
        width, sub_e = scalar(scaled.args[0]), scaled.args[1]
    sub = call(sub_e, "relax.subtract")
    centers = const_array(sub.args[1]) if sub is not None else None
    if width is None or centers is None or centers.dtype != np.float32 or centers.ndim != 1:
        return None
    ed = call(sub.args[0], "relax.expand_dims")
    if ed is None or const_ints(ed.attrs.axis) not in ([4], [-1]):
        return None
    item = bound.get(ed.args[0]) if isinstance(ed.args[0], relax.Var) else None
    if not isinstance(item, relax.TupleGetItem) or int(item.index) != 0:
        return None
    bn = call(item.tuple_value, "relax.nn.batch_norm")
    if bn is None or not bn.args[0].same_as(bn_input) or int(bn.attrs.axis) != 1 or bool(bn.attrs.training):
        return None
    stats = [const_array(a) for a in bn.args[1:5]]
    n, c, _, _ = rs
    if any(a is None or a.size != c for a in stats) or static_shape(x) != (n, c * (len(centers) + 1), *rs[2:]):
        return None
    gamma, beta, mean, var = (np.asarray(a, np.float64).reshape(c) for a in stats)  # type: ignore[union-attr]
    scale = gamma / np.sqrt(var + float(bn.attrs.epsilon))
    coef = rbf_coefficients(scale, beta - mean * scale, centers, width)
    return raw, RbfInput(channels=c, centers=len(centers)), coef



def match_max_pool_2x2(value: Any) -> Any:
    """The input of ``value`` when it is a 2x2, stride-2, unpadded max pool (``match_max_pool``), else None."""
    m = match_max_pool(value)
    return m[0] if m is not None and m[1:4] == (2, 2, (2, 2)) and not any(m[4]) else None


def call_args(value: Any) -> list[Any]:
    """The arguments of a call (the fields of a tuple), else nothing."""
    from tvm import relax

    if isinstance(value, relax.Call):
        return list(value.args)
    if isinstance(value, relax.Tuple):
        return list(value.fields)
    return []


def blocked_outputs(heads: dict[Any, Conv], alone: set[Any], pools: dict[Any, Any], uses: dict[Any, int],
                    params: Any) -> tuple[dict[Any, int], dict[Any, int]]:
    """Which activations stay channel-blocked: (var -> block for the outputs stored blocked, pool var -> its input's
    block for the max pools that read a blocked output). A conv output of a layer in ``alone`` (each run by
    ``conv2d_kernel`` on its own) is stored blocked (``ConvParams.blocked_out``) when its every use is the input or
    the residual (of the same block) of a layer in ``alone``, or the input of a max pool in ``pools`` (var -> its
    input); such a pool then runs ``max_pool_blocked_kernel``, and its own output is blocked under the same
    condition. The transposed scalar stores of an NCHW output cost 4-7 % of a ResNet 3x3 layer and 12-25 % of its
    7x7 stem (kernel alone, interleaved). Outputs used by anything else stay NCHW."""
    refs: dict[Any, list[tuple[Any, str]]] = {}
    for var in alone:
        conv = heads[var]
        refs.setdefault(conv[0], []).append((var, "x"))
        if conv[5] is not None:
            refs.setdefault(conv[5], []).append((var, "r"))
    for var, src in pools.items():
        refs.setdefault(src, []).append((var, "pool"))

    def all_uses_read_blocks(var: Any, block: int) -> bool:
        users = refs.get(var, [])
        return bool(users) and uses.get(var, 0) == len(users) and all(
            role != "r" or params(heads[user]).block_oc == block for user, role in users)

    blocked: dict[Any, int] = {}
    for var in alone:
        boc = params(heads[var]).block_oc
        if all_uses_read_blocks(var, boc):
            blocked[var] = boc
    pool_inputs = {var: blocked[src] for var, src in pools.items() if src in blocked}
    blocked.update({var: block for var, block in pool_inputs.items() if all_uses_read_blocks(var, block)})
    return blocked, pool_inputs


def match_max_pool(value: Any) -> PoolMatch | None:
    """(input, kh, kw, stride, pad (top, left, bottom, right)) when ``value`` is an NCHW float32 max pool of a static
    4-D input, floor mode, dilation 1, padding smaller than the window (``pool.max_pool_blocked_kernel``)."""
    import tvm
    from tvm import relax

    if not (isinstance(value, relax.Call) and value.op == tvm.ir.Op.get("relax.nn.max_pool2d")):
        return None
    at = value.attrs
    x = value.args[0]
    xs = static_shape(x)
    kh, kw = const_ints(at.pool_size)
    pad = const_ints(at.padding)
    pad4 = (pad[0], pad[1], pad[0], pad[1]) if len(pad) == 2 else tuple(pad[:4])
    if (xs is None or len(xs) != 4 or str(x.ty.dtype) != "float32" or const_ints(at.dilation) != [1, 1]
            or bool(at.ceil_mode) or str(at.layout) != "NCHW" or str(at.out_layout) != "NCHW"
            or pad4[0] >= kh or pad4[2] >= kh or pad4[1] >= kw or pad4[3] >= kw):
        return None
    sh, sw = const_ints(at.strides)
    return x, kh, kw, (sh, sw), pad4  # type: ignore[return-value]


def conv_layer_key(x_shape: tuple[int, ...], w_shape: tuple[int, ...], at: Any, bias: bool, relu: bool,
                   residual: bool) -> str:
    """A conv layer's identity, independent of tiling: what it computes (shapes, stride, padding, dilation, groups,
    epilogue). Two layers with the same key are the same workload; the per-layer choice between the hand-written
    kernel and a tuned schedule (targets.tvm.tuning) is keyed by it."""
    n, ic, ih, iw = x_shape
    oc, icg, kh, kw = w_shape
    pad = const_ints(at.padding)
    pad4 = (pad[0], pad[1], pad[0], pad[1]) if len(pad) == 2 else tuple(pad[:4])
    stride, dil = const_ints(at.strides), const_ints(at.dilation)
    return (f"conv2d n{n} in{ic}x{ih}x{iw} out{oc} k{kh}x{kw}g{int(at.groups)}/{icg} "
            f"s{'x'.join(map(str, stride))} d{'x'.join(map(str, dil))} p{','.join(map(str, pad4))}"
            f"{' +bias' if bias else ''}{' +residual' if residual else ''}{' +relu' if relu else ''}")


def key_of(conv: Conv) -> str:
    x, w, b, relu, at, residual = conv
    xs = static_shape(x)
    assert xs is not None
    return conv_layer_key(tuple(xs), tuple(w.shape), at, b is not None, relu, residual is not None)


class SubstituteConv(RewritePass):
    """Replaces each fp32 conv2d with a constant weight (groups 1 or depthwise) by the direct kernels, except
    the layers whose key (``conv_layer_key``) is in ``generic``: those stay with the generic lowering, where a
    tuned schedule measured faster than the kernel (targets.tvm.tuning). ``report``: one row per layer, the
    kernel's (``kernel``: its name) or the one left (``kernel``: "generic")."""

    pass_name = "SubstituteConv"

    def __init__(self, cfg: Any, generic: frozenset[str] = frozenset()) -> None:
        super().__init__(cfg)
        self.generic = frozenset(generic)

    @classmethod
    def create(cls, cfg: Any, generic: frozenset[str] = frozenset()) -> Any:
        """This rewrite as a ``tvm.transform.ModulePass``, leaving the ``generic`` layers alone."""
        return _module_pass_class(cls)(cfg, frozenset(generic))

    def rewrite(self, mod: Any) -> Any:
        import tvm
        from tvm import relax

        op_reshape = tvm.ir.Op.get("relax.reshape")

        def rewrite_for(func: Any) -> Any:
            if not isinstance(func.body, relax.SeqExpr):
                return None
            bound, uses = bindings_and_uses(func)
            heads: dict[Any, Conv] = {}
            inner_vars: list[Any] = []
            for var, value in bound.items():
                swallowed: list[Any] = []
                m = match_conv(value, bound, uses, swallowed)
                if m is not None:
                    heads[var] = m
                    inner_vars += swallowed
            for v in inner_vars:  # a conv absorbed by a bias / relu head is rewritten there, not on its own
                heads.pop(v, None)
            for var, conv in list(heads.items()):
                key = key_of(conv)
                if key in self.generic:
                    self.report.append({"kernel": "generic", "layer": key})
                    del heads[var]
            if not heads:
                return None
            # A 2x2 stride-2 max pool of a conv's output (its only use) goes into the conv's epilogue.
            pooled: set[Any] = set()
            for var, value in bound.items():
                head = match_max_pool_2x2(value)
                if head in heads and uses.get(head, 0) == 1 and int(heads[head][4].groups) == 1 and pool_fits(
                        self._params(heads[head])):
                    heads[var] = heads.pop(head)
                    pooled.add(var)
            # A reshape of a (pooled) conv output that is its only use (a flatten before a dense layer): the kernel
            # writes that shape (the same elements in the same order) instead of a separate copy kernel.
            reshaped: dict[Any, tuple[int, ...]] = {}
            for var, value in bound.items():
                if (isinstance(value, relax.Call) and value.op == op_reshape and value.args[0] in heads
                        and uses.get(value.args[0], 0) == 1 and int(heads[value.args[0]][4].groups) == 1
                        and static_shape(var) is not None):
                    head = value.args[0]
                    heads[var] = heads.pop(head)
                    if head in pooled:
                        pooled.add(var)
                    reshaped[var] = static_shape(var)  # type: ignore[assignment]
            rbf = {var: match_rbf_input(conv[0], bound) for var, conv in heads.items()}
            # Chains: a groups-1 layer whose input (its expansion's raw tensor) is the output of another, used nowhere
            # else (the expansion reads it 3 times), runs with it as one kernel (conv2d.conv_chain_kernel).
            prev: dict[Any, Any] = {}
            for var, conv in heads.items():
                src = rbf[var][0] if rbf[var] is not None else conv[0]
                if (src in heads and src not in reshaped and src not in prev.values() and conv[5] is None
                        and heads[src][5] is None and int(conv[4].groups) == 1 and int(heads[src][4].groups) == 1
                        and uses.get(src, 0) == (3 if rbf[var] is not None else 1)):
                    prev[var] = src
            stage = {var: (heads[var], rbf[var], var in pooled) for var in heads}
            for var in prev.values():
                del heads[var]  # computed inside the next layer's kernel; its own bindings are dead afterwards

            def stages(var: Any) -> list[tuple[Conv, RbfMatch | None, bool]]:
                return [*(stages(prev[var]) if var in prev else []), stage[var]]

            alone = {var for var in heads if var not in prev and var not in pooled and var not in reshaped
                     and rbf[var] is None and self._blocked_kernel(heads[var])}
            pools = {var: m for var, value in bound.items() if (m := match_max_pool(value)) is not None
                     and m[0] in alone}
            blocked, pool_inputs = blocked_outputs(heads, alone, {v: m[0] for v, m in pools.items()}, uses,
                                                   self._params)

            dropped = set(blocked)

            def replace_binding(rw: Any, binding: Any) -> Any:
                var = binding.var
                if var in pool_inputs:
                    return self._replace_pool(rw, pools[var], pool_inputs[var], var in blocked)
                if var not in heads:
                    if any(isinstance(a, relax.Var) and a in dropped for a in call_args(binding.value)):
                        dropped.add(var)  # absorbed by a kernel reading a blocked output: dead, and untyped now
                        return DROP_BINDING
                    return None
                if var in prev:
                    return self._replace_chain(rw, stages(var), reshaped.get(var))
                conv = heads[var]
                layout = (blocked.get(conv[0], 0), conv[5] is not None and conv[5] in blocked, var in blocked)
                return self._replace(rw, conv, rbf[var], var in pooled, reshaped.get(var), layout)

            return replace_binding

        return rewrite_bindings(mod, rewrite_for)

    def _params(self, conv: Conv) -> ConvParams:
        """The kernel parameters of a matched layer, tiles from the profile."""
        cfg = self.cfg
        x, w, b, relu, at, residual = conv
        xs = static_shape(x)
        assert xs is not None
        n, ic, ih, iw = xs
        oc, _, kh, kw = w.shape
        pad = const_ints(at.padding)
        pad4 = (pad[0], pad[1], pad[0], pad[1]) if len(pad) == 2 else tuple(pad[:4])
        boc = choose_block_oc(oc, cfg.conv_block_oc, cfg.lanes)
        tile_ow = tile_ow_for_block(boc, cfg.conv_block_oc, cfg.conv_tile_ow, cfg.lanes)
        p = ConvParams(n=n, ic=ic, ih=ih, iw=iw, oc=oc, kh=kh, kw=kw, stride=tuple(const_ints(at.strides)),
                       dilation=tuple(const_ints(at.dilation)), pad=pad4, bias=b is not None, relu=relu,
                       residual=residual is not None, block_oc=boc, tile_ow=tile_ow, lanes=cfg.lanes)
        return replace(p, prefetch=prefetch_fits(p))

    def _replace_pool(self, rw: Any, pool: PoolMatch, block: int, blocked_out: bool) -> tuple[Any, str]:
        """The call of ``max_pool_blocked_kernel`` for a max pool of a channel-blocked conv output."""
        from tvm import relax

        x, kh, kw, stride, pad4 = pool
        xs = static_shape(x)
        assert xs is not None
        n, c, ih, iw = xs
        p = PoolParams(n=n, c=c, ih=ih, iw=iw, kh=kh, kw=kw, stride=stride, pad=pad4, block=block,
                       blocked_out=blocked_out)
        index = self._kernel_count()
        name = f"edgec_max_pool_{index}"
        gv = rw.builder_.add_func(max_pool_blocked_kernel(p).with_attr("global_symbol", name), name)
        self.report.append({"kernel": POOL_KERNEL_NAME, "func": name, "pool": f"max_pool2d in{c}x{ih}x{iw} "
                            f"k{kh}x{kw} s{stride[0]}x{stride[1]} p{','.join(map(str, pad4))}", "in": [c, ih, iw],
                            "out": [c, p.oh, p.ow], "mflops": 0.0, "in_block": block, "blocked_out": blocked_out})
        return relax.call_tir(gv, [rw.visit_expr(x)], relax.TensorType(p.out_shape, "float32")), "pool"

    def _kernel_count(self) -> int:
        """Kernels put in so far (rows not left generic): the index that names the next one."""
        return len([r for r in self.report if r["kernel"] != "generic"])

    def _blocked_kernel(self, conv: Conv) -> bool:
        """Whether the layer runs ``conv2d_kernel`` (groups 1, not the column kernel): the kernel that can read and
        write channel-blocked activations."""
        return int(conv[4].groups) == 1 and not columns_fit(self._params(conv))

    def _replace(self, rw: Any, conv: Conv, rbf: RbfMatch | None = None, pool: bool = False,
                 y_shape: tuple[int, ...] | None = None,
                 layout: tuple[int, bool, bool] = (0, False, False)) -> tuple[Any, str]:
        """The call of the layer's kernel; ``layout``: (the input's channel block or 0 for NCHW, whether the residual
        and whether the output are channel-blocked, see ``blocked_outputs``)."""
        from tvm import relax

        x, w, b, _, at, residual = conv
        in_block, residual_blocked, blocked_out = layout
        p = replace(self._params(conv), pool=pool, in_block=in_block, residual_blocked=residual_blocked,
                    blocked_out=blocked_out)
        oc, kh, kw, boc = p.oc, p.kh, p.kw, p.block_oc
        depthwise = int(at.groups) > 1
        index = self._kernel_count()
        if depthwise:
            rbf = None  # an expanded input has more channels than the conv's groups
        bias_values = np.zeros((bias_size(p),), np.float32)
        if b is not None:
            bias_values[: len(b)] = b
        bias = relax.const(bias_values)
        if depthwise:
            name, kname = f"edgec_conv2d_dw_{index}", DEPTHWISE_KERNEL_NAME
            func = depthwise_kernel(p)
            wc = relax.const(np.ascontiguousarray(w.reshape(oc, kh, kw)))
        elif columns_fit(p):  # fewer channels than a vector: vectorized over output columns instead
            name, kname = f"edgec_conv2d_{index}", KERNEL_NAME
            func = conv2d_columns_kernel(p, rbf[1] if rbf else None, y_shape)
            wc = relax.const(pack_conv_weight(w, oc))
            boc, p = oc, replace(p, block_oc=oc, tile_ow=p.ow)
        else:
            name, kname = f"edgec_conv2d_{index}", KERNEL_NAME
            func = conv2d_kernel(p, rbf[1] if rbf else None, y_shape)
            wc = relax.const(pack_conv_weight(w, boc))
        gv = rw.builder_.add_func(func.with_attr("global_symbol", name), name)
        self.report.append(self._row(conv, p, kname, name, boc, rbf is not None))
        yshape = y_shape if y_shape is not None else p.stored_shape
        inputs = [rw.visit_expr(rbf[0]), relax.const(rbf[2])] if rbf is not None else [rw.visit_expr(x)]
        args = [*inputs, wc, bias, *([rw.visit_expr(residual)] if residual is not None else [])]
        return relax.call_tir(gv, args, relax.TensorType(yshape, "float32")), "conv"

    def _row(self, conv: Conv, p: ConvParams, kname: str, name: str, boc: int, rbf: bool) -> dict[str, Any]:
        """The report row of one layer."""
        depthwise = int(conv[4].groups) > 1
        return {"kernel": kname, "func": name, "layer": key_of(conv), "in": [p.ic, p.ih, p.iw],
                "out": [p.oc, p.oh, p.ow], "kernel_hw": [p.kh, p.kw], "stride": list(p.stride), "pad": list(p.pad),
                "block_oc": boc, "tile_ow": choose_tile_ow(p.ow, p.tile_ow), "bias": p.bias, "relu": p.relu,
                "residual": p.residual, "mflops": round(p.mflops / (p.ic if depthwise else 1), 2),  # one channel each
                "rbf_input": rbf, "max_pool": p.pool, "prefetch": p.prefetch, "in_block": p.in_block,
                "blocked_out": p.blocked_out}

    def _replace_chain(self, rw: Any, stages: list[tuple[Conv, RbfMatch | None, bool]],
                       y_shape: tuple[int, ...] | None) -> tuple[Any, str]:
        """One call of conv2d.conv_chain_kernel for consecutive layers (the first one's input, then per layer
        [coef], packed weight, bias)."""
        from tvm import relax

        index = self._kernel_count()
        name = f"edgec_conv2d_chain_{index}"
        params: list[tuple[ConvParams, RbfInput | None]] = []
        args: list[Any] = []
        for i, (conv, rbf, pool) in enumerate(stages):
            x, w, b = conv[0], conv[1], conv[2]
            p = replace(self._params(conv), pool=pool)
            boc = p.oc if columns_fit(p) else p.block_oc
            params.append((p, rbf[1] if rbf is not None else None))
            if i == 0:
                args.append(rw.visit_expr(rbf[0] if rbf is not None else x))
            if rbf is not None:
                args.append(relax.const(rbf[2]))
            bias = b if b is not None else np.zeros((1,), np.float32)
            args += [relax.const(pack_conv_weight(w, boc)), relax.const(bias)]
            shown = replace(p, block_oc=boc, tile_ow=p.ow) if columns_fit(p) else p
            row = self._row(conv, shown, KERNEL_NAME, name, boc, rbf is not None)
            self.report.append({**row, "chain": len(stages)})
        func = conv_chain_kernel(params, y_shape)
        gv = rw.builder_.add_func(func.with_attr("global_symbol", name), name)
        yshape = y_shape if y_shape is not None else params[-1][0].out_shape
        return relax.call_tir(gv, args, relax.TensorType(yshape, "float32")), "conv"


__all__ = ["SubstituteConv", "blocked_outputs", "conv_layer_key", "key_of", "match_conv"]
