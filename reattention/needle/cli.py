"""``python -m reattention``: argument parsing and the demo's main."""
import time

import torch

from .data import MIN_LENGTH, TRAINED_LENGTH
from .evaluate import evaluate, format_table, plot_heatmap
from .model import CPU_DEMO_METHODS, METHODS, NEEDLE_SETTINGS, PREFILL_CHUNK, load_model


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
    import argparse

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
    import argparse

    def parse(text):
        values = [item(x) for x in text.split(",")]
        bad = [v for v in values if choices is not None and v not in choices]
        if bad:
            raise argparse.ArgumentTypeError(f"{bad[0]!r} is not one of {', '.join(choices)}")
        return values
    return parse


def main(argv=None):
    """``python -m reattention``: the needle demo; prints the accuracy table.

    Examples
    --------
    >>> main(["--samples", "1", "--depths", "3"])                 # CPU, 1x 16x 64x
    >>> main(["--device", "cuda", "--max-len", "1048576", "--plot", "needle.png"])
    """
    import argparse
    import json
    import sys

    from ..ops import BACKENDS

    p = argparse.ArgumentParser(
        prog="python -m reattention",
        description="Needle in a haystack: a tiny Llama trained at 512 tokens, asked for a "
                    "key's value far past that length, with dense attention, a sink + local "
                    "window, and ReAttention.",
        epilog="python -m reattention --check runs only the backend report and the parity "
               "check that come before the demo.")
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
    p.add_argument("--backend", choices=BACKENDS, default="auto",
                   help="ReAttention op backend")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the results as JSON here")
    p.add_argument("--plot", default=None, help="write the depth x length heatmap PNG here")
    args = p.parse_args(argv)
    try:
        device = torch.device(args.device)
    except RuntimeError:
        p.error(f"argument --device: {args.device!r} is not a torch device (cpu or cuda)")
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("argument --device: cuda, but torch sees no CUDA device")
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise SystemExit("python -m reattention: the needle demo needs transformers (pip install "
                         "'reattention[needle]'); --check runs the backend report and the "
                         "parity check without it") from None
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            p.error("argument --plot needs matplotlib (pip install 'reattention[needle]')")
    gpu = device.type == "cuda"
    dtype = getattr(torch, args.dtype or ("bfloat16" if gpu else "float32"))
    model, _ = load_model(device, dtype)
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
                   seed=args.seed, progress=progress)
    res["total_seconds"] = round(time.perf_counter() - t0, 1)
    save(res)
    print()
    print(format_table(res))
    print(f"\n{res['total_seconds']:.0f} s; '-': skipped (dense above {dense_max} tokens)")
    if args.plot:
        plot_heatmap(res, args.plot)
        print(f"heatmap written to {args.plot}", file=sys.stderr)
    return 0
