"""``python -m reattention``: the backend report, a parity check, then the needle demo.

    python -m reattention               # backends + parity + needle demo on the CPU
    python -m reattention --check       # backends + parity only
    python -m reattention --device cuda --max-len 1048576 --plot needle.png

Arguments are checked before anything runs: a bad one (a backend or device this machine
cannot run, say) stops with argparse's one-line ``error:`` and exit code 2.
"""
import argparse
import json
import math
import os
import time

import torch

from .. import ops, reference
from ..api import reattention_attn
from ..testing import Case, make_inputs, max_err
from .data import MIN_LENGTH, TRAINED_LENGTH
from .evaluate import evaluate, format_table, plot_heatmap, summary
from .model import (CPU_DEMO_METHODS, HEAD_DIM, METHOD_DESCRIPTIONS, METHODS, NEEDLE_SETTINGS,
                    PREFILL_CHUNK, load_model)

# Where the heatmap goes unless --plot says otherwise (--no-plot: nowhere).
DEFAULT_PLOT = "needle-heatmap.png"


def default_lengths(max_len=None):
    """1x, 16x, 64x the trained length (the CPU demo), or with ``max_len`` 1x, 4x, 16x,
    64x, 128x and then x4 steps up to ``max_len`` (included); ``[max_len]`` alone when it is
    below the trained length."""
    if max_len is None:
        return [TRAINED_LENGTH * m for m in (1, 16, 64)]
    lengths = [TRAINED_LENGTH * m for m in (1, 4, 16, 64, 128) if TRAINED_LENGTH * m <= max_len]
    if not lengths:
        return [max_len]
    while lengths[-1] * 4 <= max_len:
        lengths.append(lengths[-1] * 4)
    if lengths[-1] != max_len and max_len > TRAINED_LENGTH:
        lengths.append(max_len)
    return lengths


def _int_at_least(low):
    """argparse type: an int >= ``low`` (argparse turns the error into a usage message)."""
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an int") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be an int >= {low}, got {value}")
        return value
    return parse


def _comma_list(item, choices=None):
    """argparse type: a non-empty comma-separated list, each entry through ``item``."""
    def parse(text):
        values = [item(x) for x in text.split(",")]
        bad = [v for v in values if choices is not None and v not in choices]
        if bad:
            raise argparse.ArgumentTypeError(f"{bad[0]!r} is not one of {', '.join(choices)}")
        return values
    return parse


def report_backends() -> None:
    print(f"reattention | torch {torch.__version__} | CUDA device: "
          f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}")
    for name, why in ops.available_backends().items():
        print(f"  {name:<10} {'available' if why is None else 'unavailable: ' + why}")


def parity_check() -> bool:
    """Each usable backend against the float32 reference on one small decode+prefill case."""
    case = Case(1, 8, 2, 17, 2000, 64, 16, 128, 32, 8, 8)
    ok = True
    for name, why in ops.available_backends().items():
        if why is not None or name == "reference":
            continue
        dev = "cuda" if name in ("cuda", "triton") and torch.cuda.is_available() else "cpu"
        dtype = torch.bfloat16 if name == "cuda" else torch.float32
        q, k, v, lens, inv = make_inputs(case, dtype, dev)
        kw = dict(sink=case.sink, local=case.local, chunk=case.chunk, topk=case.topk,
                  query_block=case.query_block, rep="max", inv_freq=inv)
        out = reattention_attn(q, k, v, lens, backend=name, **kw)
        ref, _, _ = reference.reattention_attn_ref(
            q.cpu().float(), k.cpu().float(), v.cpu().float(), None, inv.cpu(),
            scale=1 / math.sqrt(case.d), **{x: y for x, y in kw.items() if x != "inv_freq"})
        err = max_err(out.cpu().float(), ref)
        good = err < (2e-2 if dtype == torch.bfloat16 else 1e-4)
        ok &= good
        print(f"  parity {name:<8} {str(dtype):<15} max|out - ref| = {err:.2e} "
              f"{'ok' if good else 'MISMATCH'}")
    return ok


def _parser():
    p = argparse.ArgumentParser(
        prog="python -m reattention",
        description="Reports the usable backends, checks each against the reference, then "
                    "runs the needle demo: a tiny Llama trained at 512 tokens, asked for a "
                    "key's value far past that length, with dense attention, a sink + local "
                    "window, and ReAttention.")
    p.add_argument("--check", action="store_true",
                   help="only the backend report and the parity check (no transformers needed)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--max-len", type=_int_at_least(MIN_LENGTH), default=None,
                   help="longest prompt; lengths 1x 4x 16x 64x 128x then x4 up to it "
                        "(default: 1x 16x 64x = 512, 8K, 32K tokens)")
    p.add_argument("--lengths", type=_comma_list(_int_at_least(MIN_LENGTH)), default=None,
                   help="explicit comma-separated prompt lengths (overrides --max-len)")
    p.add_argument("--depths", type=_int_at_least(1), default=None,
                   help="needle depths, evenly from 0%% to 100%% (default 5 on the CPU, 11 on "
                        "a GPU; 1 puts the needle at 50%%)")
    p.add_argument("--samples", type=_int_at_least(1), default=None,
                   help="prompts per (length, depth) (default 1 on the CPU, 4 on a GPU)")
    p.add_argument("--methods", type=_comma_list(str, METHODS), default=None,
                   help="comma-separated, from " + ", ".join(METHODS) + " (default on the CPU: "
                        + ", ".join(CPU_DEMO_METHODS) + "; on a GPU: all)")
    p.add_argument("--batch", type=_int_at_least(1), default=None,
                   help="prompts per forward pass (default 5 on the CPU, 16 on a GPU)")
    p.add_argument("--dense-max-len", type=_int_at_least(0), default=None,
                   help="skip dense attention above this length (default 8192 on the CPU, "
                        "131072 on a GPU: it costs N^2 and fails from 4x on; 0 skips it)")
    p.add_argument("--chunk-size", type=_int_at_least(1), default=PREFILL_CHUNK,
                   help="prefill chunk")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="model dtype (default float32 on the CPU, bfloat16 on a GPU, whose "
                        "kernels take 16-bit inputs)")
    p.add_argument("--backend", choices=ops.BACKENDS, default="auto",
                   help="ReAttention op backend (default: the first usable one)")
    p.add_argument("--offload", choices=("cpu",), default=None,
                   help="keep the ReAttention caches' middle in pinned host memory (the tiered "
                        "cache; reattention-max cannot)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the results as JSON here")
    plot = p.add_mutually_exclusive_group()
    plot.add_argument("--plot", default=None, metavar="PNG",
                      help=f"write the depth x length heatmap here (default {DEFAULT_PLOT})")
    plot.add_argument("--no-plot", action="store_true", help="write no heatmap")
    return p


def _parse(argv):
    """The parsed arguments plus ``device`` and ``dtype``; a bad one exits through
    ``p.error`` (one ``error:`` line, exit code 2) before anything runs."""
    p = _parser()
    args = p.parse_args(argv)
    try:
        args.device = torch.device(args.device)
    except RuntimeError:
        p.error(f"argument --device: {args.device!r} is not a torch device (cpu or cuda)")
    if args.device.type == "cuda" and not torch.cuda.is_available():
        p.error("argument --device: cuda, but torch sees no CUDA device")
    gpu = args.device.type == "cuda"
    args.dtype = getattr(torch, args.dtype or ("bfloat16" if gpu else "float32"))
    if args.backend != "auto":
        # What the model's attention will hand the backend: its head dim, dtype and device.
        like = torch.empty(0, 1, 1, HEAD_DIM, dtype=args.dtype, device=args.device)
        why = ops._kernel_refusal(args.backend, like)
        if why is not None:
            p.error(f"argument --backend: {args.backend!r} cannot run here: {why}")
    if args.plot is not None:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            p.error("argument --plot needs matplotlib (pip install 'reattention[needle]')")
    # Output files are written after the run (hours on a GPU): refuse a folder that cannot
    # take them now.
    for flag, path in (("--plot", args.plot), ("--json", args.json)):
        folder = os.path.dirname(os.path.abspath(path)) if path else None
        if folder and not (os.path.isdir(folder) and os.access(folder, os.W_OK)):
            p.error(f"argument {flag}: cannot write into {folder}")
    return args


def main(argv=None):
    """``python -m reattention``: backends, parity, then the needle demo's table and heatmap.

    Returns the exit code: 0, or 1 when a backend disagrees with the reference.

    Examples
    --------
    >>> main(["--samples", "1", "--depths", "3"])                 # CPU, 1x 16x 64x
    >>> main(["--device", "cuda", "--max-len", "1048576", "--plot", "needle.png"])
    """
    args = _parse(argv)
    report_backends()
    ok = parity_check()
    if args.check:
        return 0 if ok else 1
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise SystemExit("python -m reattention: the needle demo needs transformers (pip install "
                         "'reattention[needle]'); --check runs the backend report and the "
                         "parity check without it") from None
    return demo(args) or (0 if ok else 1)


def demo(args):
    """The needle demo on parsed arguments (:func:`_parse`); returns 0."""
    device, gpu = args.device, args.device.type == "cuda"
    model, _ = load_model(device, args.dtype)
    lengths = args.lengths or default_lengths(args.max_len)
    n_depths = args.depths if args.depths is not None else (11 if gpu else 5)
    depths = [i / (n_depths - 1) for i in range(n_depths)] if n_depths > 1 else [0.5]
    samples = args.samples or (4 if gpu else 1)
    methods = args.methods or (list(METHODS) if gpu else list(CPU_DEMO_METHODS))
    batch = args.batch or (16 if gpu else 5)
    dense_max = args.dense_max_len if args.dense_max_len is not None else (
        131072 if gpu else 8192)
    print(f"needle: model trained at {TRAINED_LENGTH} tokens; {len(depths)} depths x "
          f"{samples} sample{'s' * (samples != 1)} per length; ReAttention "
          f"{NEEDLE_SETTINGS}, prefill chunk {args.chunk_size}; {device} {model.dtype}",
          flush=True)

    def save(res):
        if args.json:
            with open(args.json, "w") as f:
                json.dump(res, f, indent=1)

    def progress(line, res):
        print(line, flush=True)
        save(res)  # a run cut short still leaves what it measured

    t0 = time.perf_counter()
    res = evaluate(model, lengths, depths, samples, methods, batch=batch,
                   chunk_size=args.chunk_size, dense_max_len=dense_max, backend=args.backend,
                   seed=args.seed, progress=progress, offload=args.offload)
    res["total_seconds"] = round(time.perf_counter() - t0, 1)
    save(res)
    print()
    for m in methods:
        print(f"{m}: {METHOD_DESCRIPTIONS[m]}")
    print()
    print(format_table(res))
    print(f"\n{res['total_seconds']:.0f} s; '-': skipped (dense above {dense_max} tokens)")
    closing = summary(res)
    if closing:
        print(closing)
    if not args.no_plot:
        path = args.plot or DEFAULT_PLOT
        try:
            plot_heatmap(res, path)
            print(f"heatmap: {path}")
        except (ImportError, OSError) as e:  # the default path: --plot checked both up front
            print(f"no heatmap: {e}")
    return 0
