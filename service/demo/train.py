"""Train the demo CLIP (`clip-demo-shapes`) on synthetic captioned shapes, on the CPU.

    python -m service.demo.train --out demo/clip-demo-shapes.pt

The model, loss and preprocessing are open_clip's own: `create_model_and_transforms`,
`ClipLoss`, and the *eval* image transform, so training sees exactly the tensors that
inference will. The saved file is a plain `state_dict` that
`open_clip.create_model('clip-demo-shapes', pretrained=PATH)` loads.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from service.demo import shapes
from service.model.encoders import TextEncoder

MODEL_NAME = "clip-demo-shapes"
# Different streams from the training seed, so every evaluation image is fresh.
PERIODIC_EVAL_SEED_OFFSET = 10_000
FINAL_EVAL_SEED_OFFSET = 20_000
# Kept free at the end of the time budget for periodic evals and saving.
BUDGET_MARGIN_S = 15.0

Preprocess = Callable[[Image.Image], torch.Tensor]


def _set_seeds(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def encode_text_trimmed(text_encoder: TextEncoder, text: torch.Tensor) -> torch.Tensor:
    """Normalized text features from only the first L positions (L = longest caption).

    The exported graph's `TextEncoder` (sharing the model's parameters) is the same
    shortcut the service serves with: same features and gradients as `encode_text`,
    about 5x faster for ~12-token captions (checked in `_check_trimmed`).
    """
    length = int((text != 0).sum(dim=1).max())
    return text_encoder(text[:, :length])


def _check_trimmed(model: torch.nn.Module, text_encoder: TextEncoder, tokens: torch.Tensor) -> None:
    with torch.no_grad():
        want = torch.nn.functional.normalize(model.encode_text(tokens), dim=-1)
        diff = (encode_text_trimmed(text_encoder, tokens) - want).abs().max()
    if float(diff) > 1e-4:
        raise RuntimeError(f"trimmed text encoding differs from encode_text by {float(diff)}")


@torch.no_grad()
def label_embeddings(model: torch.nn.Module, tokenizer: Callable) -> torch.Tensor:
    """[48, D] zero-shot classifier: per label, normalized mean of its TEMPLATES, as CLIP."""
    rows = []
    for label in shapes.LABELS:
        feats = model.encode_text(tokenizer([t.format(label) for t in shapes.TEMPLATES]))
        feats = torch.nn.functional.normalize(feats, dim=-1).mean(dim=0)
        rows.append(torch.nn.functional.normalize(feats, dim=0))
    return torch.stack(rows)


@torch.no_grad()
def _accuracy(
    model: torch.nn.Module,
    classifier: torch.Tensor,
    preprocess: Preprocess,
    seed: int,
    n_per_pair: int,
    pairs: Sequence[tuple[str, str]],
) -> float:
    images, labels = shapes.make_eval_set(seed, n_per_pair, pairs)
    correct = 0
    for i in range(0, len(images), 256):
        x = torch.stack([preprocess(im) for im in images[i : i + 256]])
        feats = torch.nn.functional.normalize(model.encode_image(x), dim=-1)
        pred = (feats @ classifier.T).argmax(dim=-1)
        correct += int((pred == torch.tensor(labels[i : i + 256])).sum())
    return correct / len(images)


def evaluate(
    model: torch.nn.Module,
    tokenizer: Callable,
    preprocess: Preprocess,
    seed: int,
    n_per_pair: int,
) -> dict[str, float]:
    """48-way zero-shot accuracy on fresh images: `seen` (training pairs) and `held_out`."""
    was_training = model.training
    model.eval()
    try:
        classifier = label_embeddings(model, tokenizer)
        # Separate seeds per split so adding or removing a pair doesn't shift the other.
        return {
            "seen": _accuracy(model, classifier, preprocess, seed, n_per_pair, shapes.TRAIN_PAIRS),
            "held_out": _accuracy(
                model, classifier, preprocess, seed + 1, n_per_pair, shapes.HELD_OUT_PAIRS
            ),
        }
    finally:
        model.train(was_training)


class ImagePool:
    """Preprocessed training images, `per_pair` slots per pair, partly re-rendered each step.

    Rendering plus preprocessing costs about a third of a training step; reusing each
    image a few times while a steady stream of fresh ones replaces them keeps the data
    varied at a fraction of that cost.
    """

    def __init__(
        self,
        rng: random.Random,
        preprocess: Preprocess,
        pairs: Sequence[tuple[str, str]],
        per_pair: int,
    ) -> None:
        self.rng = rng
        self.preprocess = preprocess
        self.pairs = list(pairs)
        self.per_pair = per_pair
        first = preprocess(shapes.render(*self.pairs[0], rng))
        self.images = torch.empty((len(self.pairs), per_pair, *first.shape), dtype=first.dtype)
        for p in range(len(self.pairs)):
            for k in range(per_pair):
                self._render(p, k)

    def _render(self, p: int, k: int) -> None:
        self.images[p, k] = self.preprocess(shapes.render(*self.pairs[p], self.rng))

    def refresh(self, n: int) -> None:
        for _ in range(n):
            self._render(self.rng.randrange(len(self.pairs)), self.rng.randrange(self.per_pair))

    def batch(self, pair_ids: Sequence[int]) -> torch.Tensor:
        slots = [self.rng.randrange(self.per_pair) for _ in pair_ids]
        return self.images[torch.tensor(pair_ids), torch.tensor(slots)]


def _balanced_pairs(rng: random.Random, n_pairs: int, batch_size: int) -> list[int]:
    # Every pair equally often (±1) in each batch: no pair dominates a step's negatives
    # and rare colours or shapes are not starved.
    ids = list(range(n_pairs)) * (batch_size // n_pairs)
    ids += rng.sample(range(n_pairs), batch_size - len(ids))
    rng.shuffle(ids)
    return ids


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    # open_clip's rule: no weight decay on gains, biases, norms and the logit scale.
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        skip = p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name
        (no_decay if skip or "logit_scale" in name else decay).append(p)
    return [
        {"params": no_decay, "weight_decay": 0.0},
        {"params": decay, "weight_decay": weight_decay},
    ]


def _lr_at(progress: float, base_lr: float, warmup: float) -> float:
    """Linear warmup then cosine decay to zero, over progress in [0, 1]."""
    if progress < warmup:
        return base_lr * (progress + 1e-3) / warmup
    frac = (progress - warmup) / max(1e-9, 1.0 - warmup)
    return 0.5 * base_lr * (1 + math.cos(math.pi * min(1.0, frac)))


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("demo/clip-demo-shapes.pt"))
    ap.add_argument(
        "--minutes",
        type=float,
        default=12.5,
        help="training time budget; the schedule shortens to fit it",
    )
    ap.add_argument(
        "--steps", type=int, default=800, help="planned steps (fewer if --minutes runs out first)"
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--warmup", type=float, default=0.05, help="fraction of the schedule")
    ap.add_argument("--pool-per-pair", type=int, default=96)
    ap.add_argument(
        "--fresh-per-step", type=int, default=64, help="pool images re-rendered per step"
    )
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--eval-n", type=int, default=25, help="final eval images per pair")
    ap.add_argument("--threads", type=int, default=2)
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import open_clip

    from service.model import configs as model_configs

    t_start = time.monotonic()
    torch.set_num_threads(args.threads)
    _set_seeds(args.seed)
    model_configs.register()
    model, _, preprocess = open_clip.create_model_and_transforms(MODEL_NAME, pretrained=None)
    tokenizer = open_clip.get_tokenizer(MODEL_NAME)
    model.train()
    # oneDNN's channels-last convolutions are ~1.6x faster here; same maths.
    model.visual.to(memory_format=torch.channels_last)

    pairs = list(shapes.TRAIN_PAIRS)
    # Every (pair, template) caption tokenized once; a step only indexes into this.
    captions = torch.stack(
        [tokenizer([t.format(f"{c} {s}") for t in shapes.TEMPLATES]) for c, s in pairs]
    )  # [pairs, templates, 77]
    # Raises on a text tower whose pooling cannot be trimmed (not argmax).
    text_encoder = TextEncoder(model)
    _check_trimmed(model, text_encoder, captions[:4, :3].reshape(-1, captions.shape[-1]))

    rng = random.Random(args.seed)
    pool = ImagePool(rng, preprocess, pairs, args.pool_per_pair)
    t_pool = time.monotonic() - t_start

    loss_fn = open_clip.loss.ClipLoss()
    opt = torch.optim.AdamW(
        _param_groups(model, args.weight_decay), lr=args.lr, betas=(0.9, 0.98), eps=1e-6
    )
    budget_s = args.minutes * 60.0 - t_pool
    eval_seed = args.seed + PERIODIC_EVAL_SEED_OFFSET

    from tqdm import tqdm

    print(
        f"{MODEL_NAME}: {sum(p.numel() for p in model.parameters()):,} parameters, "
        f"{len(pairs)} training pairs, {len(shapes.HELD_OUT_PAIRS)} held out, "
        f"pool {pool.images.shape[0] * pool.images.shape[1]} images built in {t_pool:.0f}s",
        flush=True,
    )
    t_train = time.monotonic()
    step = 0
    total = args.steps
    steps_s = 0.0  # wall time spent in training steps so far (evals excluded)
    shortened = False  # whether the lr schedule ever deviated from the step plan
    bar = tqdm(total=total, unit="step", dynamic_ncols=True, file=sys.stderr)
    while step < total:
        if step >= 20:
            # The schedule is by steps, so a run that fits its budget is reproducible
            # bit for bit; only when the budget would run out (a busy machine) is the
            # plan shortened, so the cosine still anneals fully inside the budget.
            # Re-planned every step from the mean step time: a burst of load from
            # other users must not cut the run for good.
            left = budget_s - (time.monotonic() - t_train) - BUDGET_MARGIN_S
            total = min(args.steps, step + max(1, int(left / (steps_s / step))))
            bar.total = total
            shortened |= total < args.steps
        t_step = time.monotonic()
        progress = step / total
        lr = _lr_at(progress, args.lr, args.warmup)
        for g in opt.param_groups:
            g["lr"] = lr

        pool.refresh(args.fresh_per_step)
        ids = _balanced_pairs(rng, len(pairs), args.batch_size)
        images = pool.batch(ids).contiguous(memory_format=torch.channels_last)
        templates = [rng.randrange(len(shapes.TEMPLATES)) for _ in ids]
        text = captions[torch.tensor(ids), torch.tensor(templates)]

        image_features = torch.nn.functional.normalize(model.encode_image(images), dim=-1)
        text_features = encode_text_trimmed(text_encoder, text)
        loss = loss_fn(image_features, text_features, model.logit_scale.exp())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            # As open_clip's trainer: a temperature above 100 only destabilizes.
            model.logit_scale.clamp_(0, math.log(100))
        steps_s += time.monotonic() - t_step
        step += 1
        bar.update(1)
        bar.set_postfix(
            loss=f"{loss.item():.3f}", lr=f"{lr:.1e}", T=f"{model.logit_scale.exp().item():.0f}"
        )
        if args.eval_every and step % args.eval_every == 0:
            acc = evaluate(model, tokenizer, preprocess, eval_seed, 5)
            bar.write(
                f"step {step:5d}  {time.monotonic() - t_train:5.0f}s  loss {loss.item():.3f}"
                f"  seen {acc['seen']:.3f}  held-out {acc['held_out']:.3f}"
            )
    bar.close()
    train_s = time.monotonic() - t_train

    model.eval()
    model.visual.to(memory_format=torch.contiguous_format)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), args.out)

    # Load the file back the way the service will, and evaluate *that* model.
    loaded = open_clip.create_model(MODEL_NAME, pretrained=str(args.out))
    loaded.eval()
    ref = model.state_dict()
    if any(not torch.equal(v, ref[k]) for k, v in loaded.state_dict().items()):
        raise RuntimeError(f"{args.out} does not load back into {MODEL_NAME} unchanged")
    acc = evaluate(loaded, tokenizer, preprocess, args.seed + FINAL_EVAL_SEED_OFFSET, args.eval_n)
    total_s = time.monotonic() - t_start
    size_mb = args.out.stat().st_size / 1e6
    print(
        f"done: {step} steps x {args.batch_size} in {train_s:.0f}s training, "
        f"{total_s:.0f}s total; saved {args.out} ({size_mb:.1f} MB)"
    )
    if shortened:
        # Even a run that recovers to the full step count followed a squeezed schedule
        # for a while, so its weights depend on the machine's load.
        print(
            f"note: the {args.steps}-step plan was shortened (to {step} steps at the end) "
            f"to fit --minutes {args.minutes:g}: this run is not bit-reproducible; "
            "a larger --minutes avoids that"
        )
    print(
        f"zero-shot 48-way on fresh images ({args.eval_n}/pair, seed "
        f"{args.seed + FINAL_EVAL_SEED_OFFSET}): seen {acc['seen']:.4f}  "
        f"held-out {acc['held_out']:.4f}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
