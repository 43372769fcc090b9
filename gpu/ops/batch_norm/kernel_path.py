"""The kernel path of batch norm: launches of cuda_src/batch_norm.cu over the channels engine's
plans (CuPy arrays; NumPy arrays under the emulate backend).

batch_norm.cu reduces a C-contiguous (outer, C, inner) view over (outer, inner); its header
comment has the kernels, their launch shapes and the bytes each op moves. The view, the plans and
the partials of the grid merge are `gpu._engines.channels`'; here, the launches: the per-channel
arrays in the accumulation dtype the kernels take (mixed parameter dtypes are converted here), the
flags, and the outputs back in the caller's layout.

The epilogue (residual add, relu; the backward's mask and dresidual) runs in the same kernels built
with BN_EPILOGUE=1 (`_kernel`), its halves chosen by the BN_RESIDUAL and BN_RELU flags; its arrays
(residual, y, dresidual) travel as x's (outer, C, inner) view.
"""
from __future__ import annotations

import numpy as np

from gpu import _backend as B
from gpu import _kernels, _launch
from gpu import _workspace as _ws
from gpu._engines import channels

from ._args import Backward, Forward, Inference, Layout, Stats


# ---------------------------------------------------------------------------------------------
# The ops
# ---------------------------------------------------------------------------------------------

def stats(a: Stats):
    """`batch_stats` on this path: (mean, var) of the kept axes' shape in x's dtype."""
    xp, _, x, lay = a
    _, mean, var, _ = _stats_launch(xp, x, None, None, None, None, lay, 0.0, 0.0, normalize=False)
    return (mean.reshape(lay.kept_shape).astype(x.dtype, copy=False),
            var.reshape(lay.kept_shape).astype(x.dtype, copy=False))


def statistics(xp, x, lay: Layout):
    """(mean, biased var) per channel, flat (C,) in the accumulation dtype."""
    _, mean, var, _ = _stats_launch(xp, x, None, None, None, None, lay, 0.0, 0.0, normalize=False)
    return mean, var


def forward(a: Forward):
    """`batch_norm_forward` on this path: (y, mean, invstd); running statistics updated in place.
    With momentum None the kernel reads the (already incremented) count itself: CuPy never syncs."""
    xp, _, x, lay, gamma, beta, running_mean, running_var, eps, momentum, batches = a[:11]
    y, mean, _, invstd = _stats_launch(xp, x, gamma, beta, running_mean, running_var, lay, eps, momentum,
                                       normalize=True, batches=None if batches is None else batches.reshape(-1),
                                       residual=a.residual, relu=a.relu)
    return y, mean.reshape(lay.kept_shape), invstd.reshape(lay.kept_shape)


def inference(a: Inference):
    """`batch_norm_inference` on this path: the per-channel scale and shift, then one pass."""
    xp, _, x, lay, gamma, beta, running_mean, running_var, eps = a[:9]
    acc = B.compute_dtype(x.dtype)
    v = channels.view(xp, x, lay)
    r = None if a.residual is None else channels.view(xp, a.residual, lay)
    y3 = B.empty(xp, v.x.shape, x.dtype)
    if v.C == 0:
        return v.restore(y3)
    scale, shift = _ws.get(xp).buffer("batch_norm.params", acc, 2 * v.C).reshape(2, v.C)   # scratch
    g, b = _as_acc(xp, gamma, acc), _as_acc(xp, beta, acc)
    rm, rv = _as_acc(xp, running_mean, acc), _as_acc(xp, running_var, acc)
    plans = channels.plans(xp, v, x.dtype, v.aligned and (r is None or r.aligned), None)
    T = channels.constant("BN_PARAMS_THREADS")
    k = plans.kernel("batch_norm_inference_params", plans.p)
    _kernels.launch(k, _launch.ceil_div(v.C, T), T,
                    k.args(scale=scale, shift=shift, gamma=g if g is not None else rv,
                           beta=b if b is not None else rv, running_var=rv, C=np.int32(v.C), eps=acc.type(eps),
                           flags=_flags(g, b)))
    _apply(xp, plans, y3, v, rm, scale, shift, r, _epilogue_flags(a.residual, a.relu))
    return v.restore(y3)


def backward(a: Backward, sync=None):
    """`batch_norm_backward` on this path: (dx, dgamma, dbeta[, dresidual]). ``sync(dbeta, dgamma,
    k, invstd) -> (a, b)``, given (synchronized batch norm), runs between the two kernels and gives
    the coefficients of dx = k dy + a (x - mean) + b from the sums over every rank (no on-chip path).
    With relu the kernels mask dy by y > 0 as they load it; dresidual is written with dx."""
    xp, _, dy, x, lay, gamma, mean, invstd = a[:8]
    ep = _epilogue_flags(a.residual_grad or None, a.relu)
    acc = B.compute_dtype(x.dtype)
    out_dtype = gamma.dtype if gamma is not None else x.dtype
    v = channels.view(xp, x, lay)
    vg = channels.view(xp, dy.astype(x.dtype, copy=False), lay)
    vy = channels.view(xp, a.y, lay) if a.relu else None
    C = v.C
    dx3 = B.empty(xp, v.x.shape, x.dtype)
    dres3 = B.empty(xp, v.x.shape, x.dtype) if a.residual_grad else None
    dgamma, dbeta, k, ca, cb = B.empty(xp, (5, C), acc)            # one allocation, five rows
    if C > 0:
        mu, istd, g = _as_acc(xp, mean, acc), _as_acc(xp, invstd, acc), _as_acc(xp, gamma, acc)
        aligned = v.aligned and vg.aligned and (vy is None or vy.aligned)
        plans = channels.plans(xp, v, x.dtype, aligned, "backward" if sync is None else None)
        p, onchip = plans.p, _onchip(plans, "batch_norm_backward_onchip", xp, x.dtype, ep)
        loads = {"dy": vg.x, "x": v.x, "y": vy.x if vy is not None else v.x, "mean": mu,
                 "flags": np.int32(_flags(g) | ep)}
        stores = {"dx": dx3, "dresidual": dres3 if dres3 is not None else dx3}
        sums = {"invstd": istd, "gamma": g if g is not None else istd, "inv_m": plans.scalars(v, acc)["inv_m"],
                "dgamma": dgamma, "dbeta": dbeta}
        if onchip is not None:
            ws, _ = plans.partials(onchip, 2, C, acc)
            ko = _kernel(plans, "batch_norm_backward_onchip", onchip, xp, x.dtype, ep)
            _kernels.launch(ko, onchip.grid, onchip.threads, ko.args_from(
                plans.geometry(v, onchip) | loads | stores | sums | {"ws": ws, "cache_rows": np.int32(onchip.cache_rows)}),
                shared_mem=onchip.smem, cooperative=onchip.parts > 1)
        else:
            ws, counters = plans.partials(p, 2, C, acc)
            geo = plans.geometry(v, p)
            kr = _kernel(plans, "batch_norm_backward_reduce", p, xp, x.dtype, ep)
            _kernels.launch(kr, p.grid, p.threads, kr.args_from(geo | loads | sums | {
                "k": k, "a": ca, "b": cb, "ws": ws, "counters": counters}), shared_mem=p.smem)
            if sync is not None:
                ca[...], cb[...] = sync(dbeta, dgamma, k, istd)
            ka = _kernel(plans, "batch_norm_backward_apply", p, xp, x.dtype, ep)
            _kernels.launch(ka, p.grid, p.threads, ka.args_from(geo | loads | stores | {"k": k, "a": ca, "b": cb}))
    out = (v.restore(dx3), dgamma.reshape(lay.kept_shape).astype(out_dtype, copy=False),
           dbeta.reshape(lay.kept_shape).astype(out_dtype, copy=False))
    return out + (v.restore(dres3),) if dres3 is not None else out


# ---------------------------------------------------------------------------------------------
# The launches
# ---------------------------------------------------------------------------------------------

def _as_acc(xp, p, acc):
    """A per-channel array (or None) as a contiguous array of the accumulation dtype."""
    if p is None or (p.ndim == 1 and p.dtype == acc and p.flags.c_contiguous):
        return p
    return xp.ascontiguousarray(p.reshape(-1), dtype=acc)


def _epilogue_flags(residual, relu: bool) -> int:
    """The kernels' BN_RESIDUAL | BN_RELU flags of the epilogue (0: none, the BN_EPILOGUE=0 module)."""
    k = channels.constant
    return (k("BN_RESIDUAL") if residual is not None else 0) | (k("BN_RELU") if relu else 0)


def _kernel(plans: channels.Plans, name: str, plan: channels.Plan, xp, dtype, ep: int):
    """Kernel `name` of the plan's module, or of its BN_EPILOGUE=1 twin when the launch has an
    epilogue (``ep``: its flags)."""
    if not ep:
        return plans.kernel(name, plan)
    return _kernels.get_kernel(channels.FAMILY, name, xp, dtype, {**plan.defines, "BN_EPILOGUE": 1})


def _onchip(plans: channels.Plans, name: str, xp, dtype, ep: int):
    """The plans' on-chip plan, unless the launch has an epilogue and the BN_EPILOGUE=1 kernel does
    not fit the persistent grid at once (more registers than the plain kernel the plan was sized
    for): then None, and the streaming kernels run."""
    o = plans.onchip
    if o is None or not ep or o.parts == 1:
        return o
    k = _kernel(plans, name, o, xp, dtype, ep)
    return o if o.tiles * o.parts <= _kernels.max_cooperative_grid(k, o.threads, o.smem) else None


_FLAGS: dict[tuple[bool, bool, bool, bool], np.int32] = {}


def _flags(gamma=None, beta=None, running=None, cumulative: bool = False) -> np.int32:
    """The kernels' BN_HAS_GAMMA | BN_HAS_BETA | BN_RUNNING | BN_CUMULATIVE flags."""
    key = (gamma is not None, beta is not None, running is not None, cumulative)
    f = _FLAGS.get(key)
    if f is None:
        k = channels.constant
        f = _FLAGS[key] = np.int32((k("BN_HAS_GAMMA") if key[0] else 0) | (k("BN_HAS_BETA") if key[1] else 0)
                                   | (k("BN_RUNNING") if key[2] else 0) | (k("BN_CUMULATIVE") if key[3] else 0))
    return f


def _stats_launch(xp, x, gamma, beta, running_mean, running_var, lay, eps, momentum, normalize, batches=None,
                  residual=None, relu=False):
    """Statistics, optionally the normalized output: (y or None, mean, var, invstd), per-channel
    arrays flat in the accumulation dtype; running stats updated in place. With the epilogue
    (``residual``, ``relu``) y is act(bn(x) + residual)."""
    acc = B.compute_dtype(x.dtype)
    v = channels.view(xp, x, lay)
    C = v.C
    mean, var, invstd, scale, shift = B.empty(xp, (5, C), acc)    # one allocation, five rows
    if C == 0:                                  # nothing to launch over
        y = xp.empty(x.shape, x.dtype) if normalize else None
        return y, mean, var, invstd
    g, b = _as_acc(xp, gamma, acc), _as_acc(xp, beta, acc)
    rm, rv = _as_acc(xp, running_mean, acc), _as_acc(xp, running_var, acc)
    y3 = B.empty(xp, v.x.shape, x.dtype) if normalize else None
    r = None if residual is None else channels.view(xp, residual, lay)
    ep = _epilogue_flags(residual, relu)
    # outputs come from the array library's allocator, 16-byte aligned: only the inputs decide
    plans = channels.plans(xp, v, x.dtype, v.aligned and (r is None or r.aligned), "forward" if normalize else None)
    p, onchip = plans.p, _onchip(plans, "batch_norm_forward_onchip", xp, x.dtype, ep)
    # absent arrays: a valid pointer the kernel never reads (the flags say so)
    named = {"mean": mean, "var": var, "invstd": invstd, "scale": scale, "shift": shift,
             "running_mean": rm if rm is not None else mean, "running_var": rv if rv is not None else mean,
             "x": v.x, "gamma": g if g is not None else mean, "beta": b if b is not None else mean,
             "eps": acc.type(eps), "momentum": acc.type(momentum or 0.0),
             "flags": np.int32(_flags(g, b, rm, momentum is None and rm is not None) | ep),
             "batches": batches if batches is not None else plans.stand_in(np.int64)}
    if onchip is not None:
        ws, _ = plans.partials(onchip, 4, C, acc)
        k = _kernel(plans, "batch_norm_forward_onchip", onchip, xp, x.dtype, ep)
        named.update(plans.fixed(v, onchip, acc), y=y3, ws=ws, cache_rows=np.int32(onchip.cache_rows),
                     residual=r.x if r is not None else v.x)
        _kernels.launch(k, onchip.grid, onchip.threads, k.args_from(named), shared_mem=onchip.smem,
                        cooperative=onchip.parts > 1)
    else:
        ws, counters = plans.partials(p, 4, C, acc)
        k = plans.kernel("batch_norm_stats", p)
        named.update(plans.fixed(v, p, acc), ws=ws, counters=counters)
        _kernels.launch(k, p.grid, p.threads, k.args_from(named), shared_mem=p.smem)
        if normalize:
            _apply(xp, plans, y3, v, mean, scale, shift, r, ep)
    if rm is not None:
        for r, r_k in ((running_mean, rm), (running_var, rv)):
            if not (r.dtype == acc and r.flags.c_contiguous):     # else r_k is r's memory
                r[...] = r_k.reshape(r.shape)   # written back in the caller's dtype
    return (v.restore(y3) if normalize else None), mean, var, invstd


def _apply(xp, plans: channels.Plans, y3, v: channels.View, center, scale, shift, r=None, ep: int = 0):
    """y = act((x - center) * scale + shift + residual) per channel (forward second pass,
    inference); r: the residual's view, ep: the epilogue's flags."""
    p = plans.p
    k = _kernel(plans, "batch_norm_apply", p, xp, y3.dtype, ep)
    _kernels.launch(k, p.grid, p.threads, k.args(y=y3, x=v.x, residual=r.x if r is not None else v.x, center=center,
                                                 scale=scale, shift=shift, flags=np.int32(ep), **plans.geometry(v, p)))
