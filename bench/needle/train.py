"""Train the needle model: a tiny Llama on key-value recall at 512 tokens.

Run on the GPU box from the repository root (about 6 minutes on an H200):

    python bench/needle/train.py --out $OUT --seconds 330

It writes ``model.safetensors`` (fp16), ``config.json`` and ``needle_train.json`` (the loss
curve, the schedule, wall time and a dense check at 1x/2x/4x) under ``--out``; copy the
first two into ``reattention/needle/weights/`` and the last into ``bench/results/``.
The step count is fixed after a timed warm-up so the cosine schedule ends on time.
"""

import argparse
import json
import math
import os
import platform
import sys
import time

import torch
from safetensors.torch import save_file
from transformers import LlamaForCausalLM

# The task and the model config live in reattention/needle/; importing the package needs no
# build of the compiled extension (an unbuilt backend is only reported unavailable).
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
from reattention import needle  # noqa: E402


def answer_metrics(model, ids, labels):
    """Loss on the answer tokens, per-token accuracy and whole-answer accuracy."""
    with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=ids.is_cuda):
        logits = model(input_ids=ids).logits[:, :-1].float()
    target = labels[:, 1:]
    mask = target != -100
    loss = torch.nn.functional.cross_entropy(logits[mask], target[mask])
    hit = (logits.argmax(-1) == target) | ~mask
    # A question's answer is VALUE_LEN consecutive labelled tokens; it is right when all are.
    per_answer = hit.unfold(1, needle.VALUE_LEN, 1).all(-1)
    starts = mask & ~torch.nn.functional.pad(mask, (1, 0))[:, :-1]
    exact = per_answer[starts[:, : per_answer.shape[1]]].float().mean()
    token = (logits.argmax(-1) == target)[mask].float().mean()
    return loss, token, exact


@torch.no_grad()
def dense_check(model, device, samples=64):
    """Whole-answer accuracy of plain dense attention at 1x, 2x and 4x (teacher forced)."""
    model.eval()
    out = {}
    for mult in (1, 2, 4):
        length = needle.TRAINED_LENGTH * mult
        hits = 0
        for s in range(samples):
            ids, answer = needle.make_sample(length, s / (samples - 1), seed=10_000 + s)
            full = torch.cat([ids, answer]).to(device)[None]
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                logits = model(input_ids=full).logits[0, length - 1 : -1]
            hits += int(torch.equal(logits.argmax(-1).cpu(), answer))
        out[f"{mult}x"] = hits / samples
    model.train()
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="folder for weights, config and log")
    p.add_argument("--seconds", type=float, default=330.0, help="training time budget")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--max-pairs", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--length", type=int, default=needle.TRAINED_LENGTH)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)

    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    config = needle.model_config()
    model = LlamaForCausalLM._from_config(config, attn_implementation="sdpa").to(device)
    params = sum(t.numel() for t in model.parameters())
    decay = [t for t in model.parameters() if t.dim() >= 2]
    no_decay = [t for t in model.parameters() if t.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.95),
        fused=device.type == "cuda",
    )
    gen = torch.Generator(device=device).manual_seed(args.seed)
    print(f"params {params}, device {device}, torch {torch.__version__}", flush=True)

    total = None  # set from the time of steps 10..50, once start-up costs are paid
    curve = []
    t0 = time.perf_counter()
    t10 = None
    step = 0
    while total is None or step < total:
        if step < args.warmup:
            lr = args.lr * (step + 1) / args.warmup
        else:
            frac = (step - args.warmup) / max(1, total - args.warmup) if total else 0.0
            lr = args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))
        for group in opt.param_groups:
            group["lr"] = lr
        ids, labels = needle.make_batch(args.batch, args.length, gen, args.max_pairs, device=device)
        loss, token_acc, exact = answer_metrics(model, ids, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        if total is None and step in (10, 50):
            if device.type == "cuda":
                torch.cuda.synchronize()
            now = time.perf_counter()
            if step == 10:
                t10 = now
            else:
                per_step = (now - t10) / 40
                total = max(step + 1, step + int((args.seconds - (now - t0)) / per_step))
                print(f"{per_step * 1e3:.1f} ms/step -> {total} steps", flush=True)
        if step % args.log_every == 0 or step == total:
            row = {
                "step": step,
                "time_s": round(time.perf_counter() - t0, 2),
                "lr": lr,
                "loss": round(loss.item(), 4),
                "token_acc": round(token_acc.item(), 4),
                "answer_acc": round(exact.item(), 4),
            }
            curve.append(row)
            print(json.dumps(row), flush=True)
    train_s = time.perf_counter() - t0

    check = dense_check(model, device) if device.type == "cuda" else {}
    print("dense whole-answer accuracy", check, flush=True)

    os.makedirs(args.out, exist_ok=True)
    # fp16 halves the file; the weights are small and well inside fp16's range.
    state = {k: v.detach().to(torch.float16).cpu().contiguous()
             for k, v in model.state_dict().items()}
    state.pop("lm_head.weight", None)  # tied to the embedding
    save_file(state, os.path.join(args.out, "model.safetensors"))
    config.save_pretrained(args.out)
    log = {
        "command": "python bench/needle/train.py "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "args": vars(args),
        "params": params,
        "steps": step,
        "train_seconds": round(train_s, 1),
        "tokens": step * args.batch * args.length,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor(),
        "torch": torch.__version__,
        "dense_check_teacher_forced": check,
        "curve": curve,
    }
    with open(os.path.join(args.out, "needle_train.json"), "w") as f:
        json.dump(log, f, indent=1)


if __name__ == "__main__":
    main()
