"""gpu-bench: this library's ops held against their peers, as a fraction of what memory allows.

    gpu-bench --quick                       # tiny suite, on the GPU if there is one, else the CPU
    gpu-bench                               # the default suite of realistic shapes
    gpu-bench --op batch_norm --dtype float16 --json out.json --plot out.png
    gpu-bench --op softmax_cross_entropy_train --shape 8192x32000 --shape 4096x128256
    gpu-bench --cpu-check                   # the NumPy path's speed targets (float32, 2 threads)
    gpu-bench --host                        # Python dispatch per call, the kernel launch a no-op
    gpu-bench --bounds                      # per kernel: bytes and SASS-instruction bounds, H100 and H200
    gpu-bench --op flce                     # fused linear + cross-entropy: time and peak memory
    gpu-bench --framework torch             # this library through gpu.torch against PyTorch's own ops
    gpu-bench --distributed --ranks 2       # synchronized BN over 2 local gloo ranks (or under torchrun/mpiexec)
    gpu-bench --traffic --op softmax        # bytes, sectors per request, bank conflicts of every kernel path (emulator)

Each row is checked against the float64 reference before it is timed (a wrong result is WRONG,
never fast) and reported against the op's minimum bytes: effective GB/s, that as a percentage of
a copy measured in the same run and of the device's datasheet bandwidth. `vs best` is the fastest
other peer's time over this row's time. Method, bytes models and peers: docs/BENCHMARKS.md.

The exit status is 1 when any result is WRONG, this library's op fails, the run was interrupted
or a report could not be written; 2 for a bad command line or `--device gpu` without a GPU.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import math
import signal
import sys
import time
import traceback
from typing import Sequence

import numpy as np

import gpu
from gpu import _backend
from gpu import _cli
from gpu._cli import output_problem

from . import peers as peer_registry
from . import report
from .devices import CpuDevice, GpuDevice, gpu_unavailable
from .harness import Row, Settings, run_case
from .host import HOST, host_cases, measure_host
from .peers import TorchPeer
from .suites import CPU_CHECK, DEFAULT_DTYPES, SUITES
from .records import BN_LAYOUTS, FAMILIES, OPS, Case


def parse_shape(spec: str) -> tuple[tuple[int, ...], str | None]:
    """'32x64x112x112' -> ((32, 64, 112, 112), None); '32x112x112x64:nhwc' -> (..., 'nhwc')."""
    dims, _, layout = spec.partition(":")
    try:
        shape = tuple(int(d) for d in dims.replace(",", "x").split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shape {spec!r}: expected sizes joined by 'x'") from None
    if len(shape) < 2 or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"--shape {spec!r}: expected at least 2 positive sizes")
    if layout and layout not in BN_LAYOUTS:
        raise argparse.ArgumentTypeError(f"--shape {spec!r}: layout must be one of {BN_LAYOUTS}")
    if layout == "nc" and len(shape) != 2 or layout in ("nchw", "nhwc") and len(shape) < 3:
        raise argparse.ArgumentTypeError(f"--shape {spec!r}: layout {layout} does not fit {len(shape)} dims")
    return shape, layout or None


def parse_ops(text: str) -> list[str]:
    """'batch_norm,log_softmax' -> op names. A family name means its ops (`softmax` is the family;
    the op alone is `softmax.softmax`, as any op may be written `family.op`)."""
    out: list[str] = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        family, dot, name = item.partition(".")
        if item == "flce":      # fused linear + cross-entropy: its own table (gpu/bench/flce.py)
            out.append(item)
        elif dot and name in FAMILIES.get(family, ()):
            out.append(name)
        elif item in FAMILIES:
            out += FAMILIES[item]
        elif item in OPS:
            out.append(item)
        else:
            raise argparse.ArgumentTypeError(f"{item!r}: expected one of {', '.join(OPS)} or a family "
                                             f"({', '.join(FAMILIES)})")
    return list(dict.fromkeys(out))


def _csv(choices: Sequence[str]):
    def parse(text: str) -> list[str]:
        items = [s.strip() for s in text.split(",") if s.strip()]
        bad = [i for i in items if i not in choices]
        if bad:
            raise argparse.ArgumentTypeError(f"{bad[0]!r}: expected one of {', '.join(choices)}")
        return items
    return parse


def _no_matplotlib() -> bool:
    return importlib.util.find_spec("matplotlib") is None


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line; exits with status 2 on a bad one (including unwritable output paths)."""
    peers = [p.name for p in peer_registry.PEERS] + [peer_registry.INTEROP_PEER.name]
    p = argparse.ArgumentParser(prog="gpu-bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Ops: " + ", ".join(OPS) + ". Families: " + ", ".join(FAMILIES)
                                + ". Peers: " + ", ".join(peers) + ". Bytes models and method: docs/BENCHMARKS.md.")
    p.add_argument("--device", choices=("auto", "gpu", "cpu"), default="auto",
                   help="auto: the GPU when CuPy sees one, else the CPU comparison")
    p.add_argument("--quick", action="store_true", help="a tiny suite (seconds)")
    p.add_argument("--headline", action="store_true",
                   help="the headline shapes only: BN 4096x1024 nc, 32x64x56x56 nchw; softmax 4096x1000, 8192x32000")
    p.add_argument("--cpu-check", action="store_true",
                   help="the NumPy path against the seed's formulas and PyTorch CPU: BN and softmax-CE "
                        "forward+backward, float32, median of 10, PyTorch on 2 threads")
    p.add_argument("--host", action="store_true",
                   help=f"this library's Python dispatch per public call, the kernel launch a no-op (emulate "
                        f"backend, no GPU needed), beside PyTorch CPU; goal <= {HOST['goal_us']:g} us per call")
    p.add_argument("--bounds", action="store_true",
                   help="no timing: each headline launch's bytes bound and SASS instruction bound on H100 and H200 "
                        "and the predicted time (gpu/bench/bounds.py; NVRTC and nvdisasm, else the recorded counts)")
    p.add_argument("--traffic", action="store_true",
                   help="the memory traffic of every kernel path of every op, traced on the emulator (no GPU "
                        "needed): bytes requested against the op's minimum, sectors per warp request, "
                        "shared-memory bank conflicts")
    p.add_argument("--framework", choices=("arrays", "torch"), default="arrays",
                   help="torch: this library through PyTorch (gpu.torch, peer ours-torch) beside ours on arrays and "
                        "PyTorch's own ops, forward+backward at the headline shapes unless --op/--shape/--quick; "
                        "the 'interop ms' column is the median of paired differences, ours-torch minus ours, timed back to back")
    p.add_argument("--distributed", action="store_true",
                   help="synchronized batch norm forward+backward per step across ranks, ours against torch's "
                        "SyncBatchNorm, with the collectives' share; run under torchrun or mpiexec, or with --ranks")
    p.add_argument("--ranks", type=int, metavar="P", help="--distributed: launch P local gloo ranks (127.0.0.1)")
    p.add_argument("--engine", choices=("auto", "torch", "mpi"), default="auto",
                   help="--distributed: the engine (auto: torch.distributed under torchrun or --ranks, mpi4py "
                        "under mpiexec)")
    p.add_argument("--op", type=parse_ops, help="ops or families (" + ", ".join(FAMILIES) + ")")
    p.add_argument("--shape", action="append", type=parse_shape, metavar="AxBx..[:LAYOUT]",
                   help="replace the suite's shapes (repeatable); LAYOUT nc|nchw|nhwc for batch norm")
    p.add_argument("--dtype", type=_csv(["float32", "float16", "float64"]),
                   help="default: float32,float16 on the GPU, float32 on the CPU")
    p.add_argument("--peer", type=_csv(peers), help="only these peers")
    p.add_argument("--repeat", type=int,
                   help=f"timed calls per row at most (GPU 100, CPU 10); --host: calls per batch ({HOST['calls']})")
    p.add_argument("--warmup", type=int, help="untimed calls per row after the check (GPU 3, CPU 1)")
    p.add_argument("--budget", type=float, help="seconds of timed calls per row (GPU 0.1, CPU 1)")
    p.add_argument("--time-limit", type=float, default=math.inf, metavar="SECONDS",
                   help="skip the rows that would start after this many seconds")
    p.add_argument("--compile-budget", type=float, default=90.0, metavar="SECONDS",
                   help="total seconds torch.compile may spend compiling before its rows are skipped")
    p.add_argument("--threads", type=int, help="PyTorch CPU threads (default: PyTorch's own)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="PATH", help="write every row and the run's context as JSON")
    p.add_argument("--jsonl", metavar="PATH",
                   help="the run's context, then each row as it is done, one JSON object a line, flushed")
    p.add_argument("--plot", metavar="PATH", help="GB/s per shape and peer as an image (matplotlib)")
    args = p.parse_args(argv)
    if args.repeat is not None and args.repeat < 1:
        p.error("--repeat: at least 1")
    if args.cpu_check and (args.quick or args.headline or args.shape or args.op or args.host):
        p.error("--cpu-check runs its own cases: drop --quick, --headline, --shape, --op and --host")
    if args.ranks is not None and (not args.distributed or args.ranks < 1):
        p.error("--ranks: a positive count, with --distributed")
    if args.distributed and (args.cpu_check or args.host or args.op or args.framework != "arrays"):
        p.error("--distributed runs its own peers: drop --cpu-check, --host, --op and --framework")
    if args.quick and args.headline:
        p.error("--quick and --headline are two suites: give one")
    if args.framework == "torch":
        if args.cpu_check or args.host:
            p.error("--framework torch runs its own peers: drop --cpu-check and --host")
        args.op = args.op or ["batch_norm_train", "softmax_cross_entropy_train"]
        args.headline = args.headline or not (args.quick or args.shape)
    if args.traffic:
        given = [f"--{n.replace('_', '-')}" for n in ("quick", "headline", "jsonl", "peer", "plot", "budget", "host",
                                                      "cpu_check", "distributed") if getattr(args, n)]
        if given:
            p.error(f"--traffic measures the kernel paths on the emulator: drop {', '.join(given)}")
        if args.dtype and len(args.dtype) > 1:
            p.error("--traffic: one --dtype")
    if args.host:
        given = [f"--{n.replace('_', '-')}" for n in ("quick", "headline", "jsonl", "shape", "dtype", "peer", "plot", "budget")
                 if getattr(args, n)] + (["--device gpu"] if args.device == "gpu" else [])
        if given:
            p.error(f"--host runs its own cases on the CPU: drop {', '.join(given)}")
        if args.op and not host_cases(args.op):
            p.error(f"--host: none of {', '.join(args.op)} has a host case")
    try:
        _backend.current_backend()   # a bad GPU_BACKEND fails every row of ours: say so now
    except ValueError as e:
        p.error(str(e))
    for flag, path in (("--json", args.json), ("--jsonl", args.jsonl), ("--plot", args.plot)):
        problem = path and output_problem(path)
        if problem:
            p.error(f"{flag} {path}: {problem}")
    if args.plot and _no_matplotlib():   # the rows and the JSON are still worth the run
        print(f"gpu-bench: --plot {args.plot}: matplotlib is not installed; the run goes on without the plot",
              file=sys.stderr)
    return args


def build_cases(args: argparse.Namespace, device_kind: str) -> list[Case]:
    """Cases ordered dtype-major (float32 first), so a time limit cuts float16 rows first."""
    if args.cpu_check:
        return [Case(OPS[op], shape, layout, np.dtype(np.float32)) for op, shape, layout in CPU_CHECK["cases"]]
    suite = SUITES["quick" if args.quick else "headline" if args.headline else device_kind]
    dtypes = args.dtype or DEFAULT_DTYPES[device_kind]
    cases = []
    for dt in dtypes:
        for name in args.op or list(OPS):
            op = OPS[name]
            if args.shape:
                shapes = [(s, "" if op.family == "softmax" else layout or ("nc" if len(s) == 2 else "nchw"))
                          for s, layout in args.shape]
            else:
                shapes = suite[op.family]
            cases += [Case(op, shape, layout, np.dtype(dt)) for shape, layout in shapes]
    return cases


def _why_no_rows(args: argparse.Namespace, peer_status: dict[str, str], device_kind: str) -> str:
    """Why no (case, peer) pair is left to run: each asked-for peer's reason."""
    why = []
    for peer in peer_registry.PEERS:
        if args.peer and peer.name not in args.peer:
            continue
        status = peer_status.get(peer.name, "ok")
        if peer.device not in ("any", device_kind):
            why.append(f"peer {peer.name} runs on the {peer.device} only")
        elif status != "ok":
            hint = (" (install PyTorch: see the torch extra in the README)"
                    if isinstance(peer, TorchPeer) and "No module named 'torch'" in status else "")
            why.append(f"peer {peer.name} is unavailable: {status}{hint}")
        else:
            why.append(f"peer {peer.name} has none of the selected ops")
    return "; ".join(why) or "no peer selected"


def _write(what: str, write) -> bool:
    return _cli.write_output("gpu-bench", what, write)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark (see `gpu-bench --help` and docs/BENCHMARKS.md); returns the exit status."""
    args = parse_args(argv)
    if args.bounds:
        from .bounds import table
        print(table())
        return 0
    if args.traffic:
        from . import traffic
        return traffic.run(args.op, args.shape, (args.dtype or ["float32"])[0], args.json)
    if args.host:
        return main_host(args, argv)
    if args.distributed:
        return main_distributed(args, argv)
    if args.op and "flce" in args.op:
        return main_flce(args)
    started = time.perf_counter()
    kind = "cpu" if args.cpu_check else args.device
    why_not = gpu_unavailable() if kind in ("auto", "gpu") else "not asked for"
    if kind == "gpu" and why_not:
        print(f"gpu-bench: --device gpu, but no GPU is usable: {why_not}", file=sys.stderr)
        return 2
    device = GpuDevice() if kind != "cpu" and not why_not else CpuDevice()
    if args.cpu_check:
        args.threads = args.threads or CPU_CHECK["threads"]
    on_gpu = device.kind == "gpu"

    def given(value, default):
        return default if value is None else value
    settings = Settings(repeat=given(args.repeat, CPU_CHECK["repeat"] if args.cpu_check else 100 if on_gpu else 10),
                        warmup=given(args.warmup, 3 if on_gpu else 1),
                        budget=given(args.budget, math.inf if args.cpu_check else 0.1 if on_gpu else 1.0),
                        deadline=started + args.time_limit, seed=args.seed)

    peer_status: dict[str, str] = {}
    peers = []
    candidates = peer_registry.PEERS
    if args.framework == "torch":
        candidates = [p for p in peer_registry.PEERS + [peer_registry.INTEROP_PEER]
                      if p.name in peer_registry.TORCH_FRAMEWORK_PEERS]
    for peer in candidates:
        if peer.device not in ("any", device.kind) or (args.peer and peer.name not in args.peer):
            continue
        reason = peer.unavailable()
        peer_status[peer.name] = reason or "ok"
        if reason is None:
            peers.append(peer)
            if isinstance(peer, TorchPeer) and peer.compiled:
                peer.compile_budget = args.compile_budget
    if args.threads and any(p.name == "torch-cpu" for p in peers):
        import torch
        torch.set_num_threads(args.threads)

    cases = build_cases(args, device.kind)
    if not any(p.supports(c.op) for c in cases for p in peers):
        print(f"gpu-bench: error: nothing to run on the {device.kind}: {_why_no_rows(args, peer_status, device.kind)}",
              file=sys.stderr)
        return 2
    rows: list[Row] = []
    interrupted = failed = False

    def run_context() -> dict:
        """What the JSON report (and the first line of --jsonl) says of the run besides its rows."""
        return report.context(argv) | {
            "device": {"kind": device.kind, "name": device.name, "copy_gbps": device.copy_gbps,
                       "spec_gbps": device.spec_gbps, "l2_bytes": device.l2_bytes},
            "peers": peer_status,
            "settings": {"repeat": settings.repeat, "warmup": settings.warmup, "seed": settings.seed,
                         "budget_s": report._finite(settings.budget),
                         "time_limit_s": report._finite(args.time_limit),
                         "threads": args.threads, "compile_budget_s": args.compile_budget},
        }
    print(f"gpu-bench {gpu.__version__} on {device.kind}: {device.name}", flush=True)
    for name, status in peer_status.items():
        if status != "ok":
            print(f"  peer {name} unavailable: {status}")

    def on_term(signum, frame):
        raise KeyboardInterrupt
    old_term = signal.signal(signal.SIGTERM, on_term)
    try:
        with device.active():
            device.measure_copy()
            print(f"  copy bandwidth (read + write, measured): {device.copy_gbps:.1f} GB/s"
                  + (f"; spec {device.spec_gbps:.0f} GB/s" if device.spec_gbps else ""), flush=True)
            if args.jsonl:   # a fresh file: its first line is this run's
                report.append_jsonl({"record": "run"} | run_context(), args.jsonl, fresh=True)
            total = sum(1 for c in cases for p in peers if p.supports(c.op))
            with _progress(total) as bar:
                for case in cases:
                    here = [p for p in peers if p.supports(case.op)]
                    bar.set_description(f"{case.op.name} {case.label()} {case.dtype.name}")
                    done = run_case(case, here, device, settings, tick=lambda: bar.update(1))
                    rows += done
                    for row in done if args.jsonl else ():
                        report.append_jsonl({"record": "row"} | row.as_json(), args.jsonl)
    except KeyboardInterrupt:
        interrupted = True
        print("gpu-bench: interrupted; reporting the rows done so far", file=sys.stderr)
    except Exception:   # a fault of the harness itself: report what was measured, then fail
        failed = True
        traceback.print_exc()
        print("gpu-bench: failed; reporting the rows done so far", file=sys.stderr)
    finally:
        signal.signal(signal.SIGTERM, old_term)

    out = run_context() | {
        "interrupted": interrupted, "failed": failed, "seconds": round(time.perf_counter() - started, 1),
        "rows": [r.as_json() for r in rows],
    }
    if args.jsonl:
        _write(args.jsonl, lambda: report.append_jsonl(
            {"record": "end", "interrupted": interrupted, "failed": failed, "seconds": out["seconds"]}, args.jsonl))
    written = _write("the table", lambda: print(report.format_table(rows)))
    if device.kind == "cpu" and rows:
        print("\n" + report.CPU_NOTE)
    if args.cpu_check:
        def cpu_check():
            text, out["cpu_check"] = report.cpu_check_report(rows)
            print(f"\nNumPy path speed check (float32, median of {settings.repeat}, "
                  f"PyTorch on {args.threads} threads)\n{text}")
        written &= _write("the CPU check", cpu_check)
    if args.json:
        written &= _write(args.json, lambda: report.write_json(out, args.json))
    if args.plot and not _no_matplotlib():
        written &= _write(args.plot, lambda: report.plot(rows, device, args.plot))

    wrong = [r for r in rows if r.status == "WRONG" or (r.peer == "ours" and r.status == "error")]
    summary = {s: sum(r.status == s for r in rows) for s in ("ok", "WRONG", "error", "unavailable", "skipped")}
    print("\n" + ", ".join(f"{n} {s}" for s, n in summary.items() if n)
          + f" rows in {time.perf_counter() - started:.0f} s" + (" (interrupted)" if interrupted else ""))
    return 1 if wrong or interrupted or failed or not written else 0


def main_flce(args: argparse.Namespace) -> int:
    """`gpu-bench --op flce`: fused linear + cross-entropy, time and peak memory per peer."""
    from . import flce
    if args.op != ["flce"]:
        print("gpu-bench: --op flce runs alone (its own table): drop the other ops", file=sys.stderr)
        return 2
    shapes = [s for s, _ in args.shape or []]
    if len(shapes) > 1 or any(len(s) != 3 for s in shapes):
        print("gpu-bench: --op flce takes one --shape TOKENSxHIDDENxVOCAB", file=sys.stderr)
        return 2
    status = 0
    for dt in args.dtype or [None]:
        status |= flce.run(shapes[0] if shapes else None, dt, args.device, args.repeat, args.warmup, args.seed,
                           args.json)
    return status


def main_distributed(args: argparse.Namespace, argv: Sequence[str] | None) -> int:
    """`gpu-bench --distributed`: synchronized batch norm across ranks (gpu/bench/distributed.py)."""
    from . import distributed
    argv = list(sys.argv[1:] if argv is None else argv)
    if args.ranks is not None:
        return distributed.launch_local(args.ranks, argv, timeout=min(args.time_limit, 3600.0))
    dtypes = args.dtype or [None]
    if len(dtypes) > 1:
        print("gpu-bench: --distributed takes one --dtype", file=sys.stderr)
        return 2
    return distributed.run([s for s, _ in args.shape or []], dtypes[0], args.device, args.engine, args.repeat,
                           args.warmup, args.seed, args.json, argv)


def main_host(args: argparse.Namespace, argv: Sequence[str] | None) -> int:
    """`gpu-bench --host`: per op, us and launches per public call, PyTorch CPU beside it."""
    started = time.perf_counter()
    # one PyTorch thread unless asked: at these sizes its pool adds only wake-up noise on a busy host
    args.threads = args.threads or 1
    with contextlib.suppress(ImportError):
        import torch
        torch.set_num_threads(args.threads)
    calls = args.repeat or HOST["calls"]
    warmup = HOST["warmup"] if args.warmup is None else args.warmup
    cases = host_cases(args.op)
    print(f"gpu-bench {gpu.__version__} --host: Python dispatch per public call, kernel launches recorded "
          f"and skipped (emulate backend, NumPy arrays); median of {HOST['batches']} batches of {calls} calls",
          flush=True)
    rows, failed = [], False
    try:
        with _progress(len(cases)) as bar:
            rows = measure_host(cases, calls=calls, batches=HOST["batches"], warmup=warmup, seed=args.seed,
                                tick=lambda: bar.update(1))
    except KeyboardInterrupt:
        failed = True
        print("gpu-bench: interrupted", file=sys.stderr)
    written = _write("the table", lambda: print(report.format_host_table(rows)))
    if args.json:
        out = report.context(argv) | {
            "mode": "host", "goal_us_per_call": HOST["goal_us"],
            "settings": {"calls_per_batch": calls, "batches": HOST["batches"], "warmup": warmup,
                         "threads": args.threads, "backend": "emulate", "launch": "recorded, not run"},
            "interrupted": failed, "seconds": round(time.perf_counter() - started, 1),
            "ops": [r.as_json() for r in rows]}
        written &= _write(args.json, lambda: report.write_json(out, args.json))
    met = sum(bool(r.meets_goal) for r in rows)
    print(f"\n{met} of {len(rows)} ops within {HOST['goal_us']:g} us per call")
    return 1 if failed or not written or any(r.status != "ok" for r in rows) else 0


@contextlib.contextmanager
def _progress(total: int):
    """A tqdm bar on stderr when tqdm is installed and stderr is a terminal."""
    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None
    if tqdm is None:
        class _Silent:
            def set_description(self, text):
                pass

            def update(self, n):
                pass
        yield _Silent()
        return
    with tqdm(total=total, file=sys.stderr, disable=None, leave=False, unit="row") as bar:
        yield bar
