"""The kernel path of the softmax family and cross-entropy (CuPy arrays; NumPy arrays under the
emulate backend): the launches of cuda_src/softmax.cu, planned by the row engine
(gpu/_engines/rows.py). Arguments arrive checked and normalized (_args).

Cross-entropy is one fused launch (loss, z-loss and dz in one pass over z), after a launch of
softmax_cross_entropy_weight_sum when the gradient of a 'mean' over integer targets needs the
summed target weight first. Integer targets are checked by the kernel (no extra pass over them, no
sync): a bad one is treated as ignored and recorded in the stream's workspace;
``gpu.check_errors()`` raises it (ValueError), or the call itself with eager checks
(``gpu.set_eager_checks``).
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ... import _backend as B
from ... import _kernels, _launch, _workspace
from ..._engines import rows
from ._args import BAD_TARGET, CEArgs, bad_target_error
from .numpy_path import empty_z_term

#: The kernel family: cuda_src/softmax.cu (with the row engine, rows.cuh).
FAMILY = "softmax"


def softmax(xp, z, ax: int, log: bool):
    """Softmax (log=True: log-softmax) of z along ax, in z's dtype."""
    lay = rows.layout(xp, z, ax)
    out = B.empty(xp, lay.z.shape, z.dtype)
    if lay.z.size:
        plan = rows.plan(xp, FAMILY, lay, z.dtype.itemsize, *rows.alignment(lay.z, out))
        k = plan.kernel(xp, "softmax", z.dtype)
        _kernels.launch(k, plan.grid_for(k), plan.block, k.args(out=out, z=lay.z, log=np.int32(log), **plan.sizes(lay)),
                        shared_mem=plan.smem)
    return lay.orient(out)


def hardmax(xp, z, ax: int):
    """One-hot of the argmax along ax, in z's dtype."""
    lay = rows.layout(xp, z, ax)
    out = B.empty(xp, lay.z.shape, z.dtype)
    if lay.z.size:
        plan = rows.plan(xp, FAMILY, lay, z.dtype.itemsize, *rows.alignment(lay.z, out), cache=False)
        k = plan.kernel(xp, "hardmax", z.dtype)
        _kernels.launch(k, plan.grid_for(k), plan.block, k.args(out=out, z=lay.z, **plan.sizes(lay, cached=False)),
                        shared_mem=plan.smem)
    return lay.orient(out)


# ---------------------------------------------------------------------------------------------
# Cross-entropy
# ---------------------------------------------------------------------------------------------

_CE_RED = {"none": "CE_RED_NONE", "sum": "CE_RED_SUM", "mean": "CE_RED_MEAN"}


class _Recipe(NamedTuple):
    """Everything about a cross-entropy launch that the arrays' values do not change: kept per
    (shape, dtype, options, alignment, device, knobs), so a repeated call only allocates and launches."""

    plan: rows.Plan
    k: object                # the fused kernel of the plan's path
    fixed: dict              # its size and option arguments, and stand-ins for the pointers the flags leave unused
    kw: object               # softmax_cross_entropy_weight_sum, or None when no denominator is needed
    grid_w: int
    block_w: int
    weight_sum: dict         # its scalar arguments (and the weight's stand-in)
    rows_out: bool           # the loss (and z-loss term) per row: loss_rows is an output
    scalar_out: bool         # the reduced loss (and z-loss term): loss_out is an output
    views: list              # [(acc buffer, counters, their views by argument name)]: the last workspace's


_RECIPES = _launch.PlanCache()


def _recipe(xp, lay: rows.Layout, dtype, acc, args: CEArgs, want_loss: bool, grad: bool, dl_stride: int,
            alignment: tuple[bool, bool]) -> _Recipe:
    dev = _launch.device(xp)
    key = (lay.outer, lay.C, lay.inner, dtype, args.probs, args.weight is not None, args.reduction, args.ignore_index,
           args.label_smoothing, args.z_loss, args.softcap, args.return_z, want_loss, grad, dl_stride, alignment,
           id(dev), rows.knobs_key())
    return _RECIPES.get(key, lambda: _make_recipe(xp, lay, dtype, acc, args, want_loss, grad, dl_stride, alignment))


def _make_recipe(xp, lay, dtype, acc, args, want_loss, grad, dl_stride, alignment) -> _Recipe:
    K = _kernels.family(FAMILY).constants
    red, R = args.reduction, lay.rows
    want_out = want_loss or args.return_z
    rows_out = want_out and red == "none"
    flags = ((K["CE_PROBS"] if args.probs else 0) | (K["CE_WEIGHT"] if args.weight is not None else 0)
             | (K["CE_GRAD"] if grad else 0) | (K["CE_ROWS"] if rows_out else 0)
             | (K["CE_SOFTCAP"] if args.softcap is not None else 0) | (K["CE_ZRET"] if args.return_z else 0))
    denom = grad and red == "mean" and not args.probs
    if denom:
        flags |= K["CE_DENOM"]
    code = K["CE_RED_MEAN_ROWS"] if red == "mean" and args.probs else K[_CE_RED[red]]
    # class weights in the per-element sums (probability targets or smoothing): on the block path,
    # softmax_cross_entropy_block_w, which reads them with the logits and has its own block bound
    weighted = args.weight is not None and (args.probs or args.label_smoothing > 0)
    # loss only: no second pass, so nothing to keep in shared memory (it would only cut occupancy)
    plan = rows.plan(xp, FAMILY, lay, dtype.itemsize, *alignment, regions=2 if args.probs else 1, cache=grad,
                     max_n=8 if dtype == np.float64 else 32,
                     max_threads=K["SM_CE_BLOCK_W_THREADS"] if weighted else None)
    # integer targets without soft-cap on the warp and block paths: the modules that fix those at
    # compile time, without label smoothing or with it (softmax.cu's CE_PLAIN, CE_SMOOTH), whose
    # per-element code tests no flag
    defines = None
    if not args.probs and args.softcap is None and plan.path != "strided":
        defines = {"CE_SMOOTH": 1} if args.label_smoothing > 0 else {"CE_PLAIN": 1}
    if weighted and plan.path == "block":
        k = plan.kernel(xp, "softmax_cross_entropy_block_w", dtype, exact=True, defines=defines)
    else:
        k = plan.kernel(xp, "softmax_cross_entropy", dtype, defines=defines)
    fixed = plan.sizes(lay, rows=None) | {
        "dloss_stride": np.int64(dl_stride), "ignore_index": np.int64(args.ignore_index),
        "label_smoothing": acc.type(args.label_smoothing), "z_loss": acc.type(args.z_loss),
        "softcap": acc.type(args.softcap or 0.0), "flags": np.int32(flags), "reduction": np.int32(code),
        "n_rows": np.int64(R)}
    # stand-ins for the pointer arguments the flags leave unused (one per device and dtype)
    unused = {"target": args.probs, "y": not args.probs, "weight": args.weight is None, "dz": not grad,
              "dloss": not grad, "inv_denom": not denom, "loss_rows": not rows_out}
    dtypes = {"target": np.int64, "y": dtype, "weight": acc, "dz": dtype, "dloss": acc, "inv_denom": acc,
              "loss_rows": dtype}
    fixed |= {name: _launch.dummy(xp, dtypes[name]) for name, stand_in in unused.items() if stand_in}
    kw, grid_w, block_w, weight_sum = None, 0, 0, {}
    if denom:
        kw = plan.kernel(xp, "softmax_cross_entropy_weight_sum", dtype, exact=True)
        block_w = K["SM_WEIGHT_SUM_THREADS"]
        grid_w = min(_launch.ceil_div(R, block_w), 4 * kw.device["sm_count"])
        weight_sum = {"has_weight": np.int32(args.weight is not None), "rows": np.int64(R), "C": np.int32(lay.C),
                      "ignore_index": np.int64(args.ignore_index)}
        if args.weight is None:
            weight_sum["weight"] = fixed["weight"]
    return _Recipe(plan, k, fixed, kw, grid_w, block_w, weight_sum, rows_out, want_out and red != "none", [None])


def cross_entropy(args: CEArgs, want_loss: bool, dloss, inplace: bool = False):
    """(loss or None, z-loss term or None, dz or None) for at least one class, from the fused
    kernels; the same contract as numpy_path.cross_entropy (dloss: a Python float is kept as a
    device constant, an array is the caller's device memory)."""
    xp, z = args.xp, args.z
    acc = B.compute_dtype(z.dtype)
    lay = rows.layout(xp, z, args.axis)
    R = lay.rows
    grad = dloss is not None
    red = args.reduction

    if R == 0:   # nothing to launch: the reference's values for empty sums
        loss = None
        if want_loss:
            loss = (xp.empty(args.row_shape, z.dtype) if red == "none"
                    else xp.asarray(0 if red == "sum" else np.nan, dtype=z.dtype))
        return loss, empty_z_term(args), (xp.empty(z.shape, z.dtype) if grad else None)

    named = {"z": lay.z}   # the call's arrays; the recipe holds the rest
    if args.probs:
        named["y"] = y = xp.ascontiguousarray(lay.orient(args.target).astype(z.dtype, copy=False))
    else:
        named["target"] = xp.ascontiguousarray(lay.orient(args.target).astype(np.int64, copy=False))
    if args.weight is not None:
        named["weight"] = xp.ascontiguousarray(args.weight.astype(acc, copy=False))
    dl_stride = 0
    if grad:
        named["dz"] = dz = lay.z if inplace else B.empty(xp, lay.z.shape, z.dtype)
        if B.is_cupy_array(dloss) or getattr(dloss, "ndim", 0):
            dl = xp.asarray(dloss, dtype=acc)
            if dl.ndim:   # 'none' with one upstream gradient per row
                dl, dl_stride = xp.ascontiguousarray(lay.orient(dl)).reshape(-1), 1
            else:
                dl = dl.reshape(1)
            if red == "mean" and args.probs:    # 'mean' over rows: known here
                dl = dl * acc.type(1 / R)
            named["dloss"] = dl
    else:
        dz = _launch.dummy(xp, z.dtype)   # the recipe's stand-in: aligned like it
    r = _recipe(xp, lay, z.dtype, acc, args, want_loss, grad, dl_stride,
                rows.alignment(lay.z, dz, y) if args.probs else rows.alignment(lay.z, dz))
    if grad and "dloss" not in named:   # a host scalar: a kept device constant, not an upload per call
        scale = acc.type(1 / R) if red == "mean" and args.probs else None
        named["dloss"] = _launch.constant(xp, acc, float(dloss) * (1.0 if scale is None else float(scale)))

    G = r.plan.grid_for(r.k)
    # scratch from the stream's persistent workspace (no allocation, no memset): acc partials of
    # both kernels (4 and 2 per block) and the inverse denominators, the per-block first bad rows,
    # both kernels' tickets (the last block leaves them at zero), the sticky bad-target record
    ws = _workspace.get(xp)
    fbuf = ws.buffer("softmax_cross_entropy.acc", acc, 4 * G + (2 * r.grid_w + 2 if r.kw is not None else 0))
    tickets = ws.counters("softmax_cross_entropy", 2)
    views = r.views[0]   # one read: another thread may replace it
    if views is None or views[0] is not fbuf.base or views[1] is not tickets.base:
        views = r.views[0] = (fbuf.base, tickets.base, _scratch_views(r, fbuf, tickets))
    fused, sums = views[2]
    named |= fused
    named["bad_out"] = ws.error_record(BAD_TARGET)
    named["part_bad"] = ws.buffer("softmax_cross_entropy.bad", np.int64, G)
    if sums is not None:
        # 1 / (sum of the target weights), which every gradient element needs before it is written
        sums = sums | {"target": named["target"]}
        if args.weight is not None:
            sums["weight"] = named["weight"]
        _kernels.launch(r.kw, r.grid_w, r.block_w, r.kw.args_from(sums))
    nz = 2 if args.return_z else 1   # the z-loss term follows the loss (rows or scalar)
    if r.rows_out:
        named["loss_rows"] = loss_rows = B.empty(xp, nz * R, z.dtype)
    # the reduced loss: an output, or (gradient only) scratch the kernel writes anyway
    named["loss_out"] = loss_out = (B.empty(xp, nz, z.dtype) if r.scalar_out
                                    else ws.buffer("softmax_cross_entropy.loss", z.dtype, nz))
    _kernels.launch(r.k, G, r.plan.block, r.k.args_from(r.fixed | named), shared_mem=r.plan.smem)

    # A bad target stays on the device (no sync here): recorded for gpu.check_errors(), unless
    # eager checks read the record now and raise with the exact position.
    if _workspace.eager_checks() and not args.probs and _kernels.launches_run():
        found = ws.read_error(BAD_TARGET)
        if found is not None:
            pos = tuple(int(i) for i in np.unravel_index(found[0], lay.row_shape))
            raise bad_target_error(args.target, pos[::-1] if lay.flip else pos, lay.C, args.ignore_index)

    loss = z_term = None
    if want_loss:
        if red == "none":
            loss = lay.orient(loss_rows[:R].reshape(lay.row_shape))
        else:
            loss = loss_out[:1].reshape(()) if args.return_z else loss_out.reshape(())
    if args.return_z:
        z_term = lay.orient(loss_rows[R:].reshape(lay.row_shape)) if red == "none" else loss_out[1:2].reshape(())
    out = None
    if grad:
        out = lay.orient(dz)
        if inplace and lay.copied:
            z[...] = out
            out = z
    return loss, z_term, out


def _scratch_views(r: _Recipe, fbuf, tickets) -> tuple[dict, dict | None]:
    """The workspace views a recipe's launches take (the fused kernel's, and the weight sum's with
    its scalars, or None): kept while the workspace keeps the same buffers."""
    G = r.plan.grid_for(r.k)
    fused = {"part_loss": fbuf[:G], "part_w": fbuf[G:4 * G], "ticket": tickets[:1]}
    if r.kw is None:
        return fused, None
    fused["inv_denom"] = inv_denom = fbuf[4 * G:4 * G + 2]
    return fused, r.weight_sum | {"inv_denom": inv_denom, "part": fbuf[4 * G + 2:], "ticket": tickets[1:]}


def record_bad_target(xp, t, n_classes: int, ignore_index: int) -> None:
    """The first class index of t (flat) outside [0, n_classes) that is not ignore_index, at its
    position in t, into the workspace's sticky record for ``gpu.check_errors()``, with no sync (a
    call that runs its rows in chunks records before they run: their kernels would record rows
    relative to the chunk, and leave this record alone)."""
    if not t.size:
        return
    bad = ((t < 0) | (t >= n_classes)) & (t != ignore_index)
    first = bad.argmax()
    vals = xp.empty(4, np.int64)
    # slices, not elements: an element assignment of a device scalar would read it back
    vals[0:1] = first
    vals[1:2] = t[first]
    vals[2:3] = n_classes
    vals[3:4] = ignore_index
    rec = _workspace.get(xp).error_record(BAD_TARGET)
    xp.copyto(rec, vals, where=(rec[0] < 0) & bad[first])
