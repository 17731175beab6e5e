"""Train the `xar-digits` demo model: xAR on scikit-learn's 8x8 handwritten digits, in pixel space.

The network is the package's own XARTransformer (the released architecture at a small size and a
small token grid: 8x8 pixels, one channel, 4 cells of 4x4). The objective is xAR's: every cell gets its
own noise level t ~ logit-normal, the target is the velocity eps - x, all cells are trained at once,
each seeing its image's earlier (noisy) cells and itself as under the released block-causal mask, and
10% of labels are dropped to the null class so that guidance works. Weights are kept as an exponential
moving average, as in the released training.

    python tools/train_demo.py                      # writes src/xar_infer/data/xar-digits/
    python tools/train_demo.py --steps 200 --out /tmp/digits   # a quick look

Deterministic for a given seed and thread count (CPU). About 18 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import copy
import math
import time
from pathlib import Path

import torch
from sklearn.datasets import load_digits

from xar_infer.config import PRESETS
from xar_infer.hub import save_model_folder
from xar_infer.loading import CONFIG_NAME, WEIGHTS_NAME
from xar_infer.model import CellBatch, XARTransformer
from xar_infer.sampling import latent_to_tokens

PRESET_NAME = "xar-digits"
PRESET = PRESETS[PRESET_NAME]
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "src" / "xar_infer" / "data" / PRESET.bundled_dir
LABEL_DROP = 0.1  # as the released training


def digits_as_tokens(config) -> tuple[torch.Tensor, torch.Tensor]:
    """All 1797 digits as [N, 64, 1] tokens in [-1, 1] (pixel levels 0..16), in cell order, and labels."""
    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32)[:, None] / 8.0 - 1.0  # [N, 1, 8, 8]
    return latent_to_tokens(images * config.latent_scale, config.cell_size), torch.tensor(data.target)


def init_weights(model: XARTransformer) -> None:
    """The released initialisation: Xavier-uniform linears with zero bias, N(0, 0.02) embeddings."""
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            torch.nn.init.xavier_uniform_(module.weight)
            torch.nn.init.zeros_(module.bias)
    for tensor in (model.class_emb.weight, model.encoder_pos_embed_learned, model.decoder_pos_embed_learned):
        torch.nn.init.normal_(tensor, std=0.02)


def flow_matching_loss(model: XARTransformer, tokens: torch.Tensor, labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    config = model.config
    B = len(tokens)
    labels = torch.where(torch.rand(B, generator=generator) < LABEL_DROP, model.null_class, labels)
    t = torch.sigmoid(torch.randn(B, config.num_cells, generator=generator))  # one noise level per cell
    t_tokens = t.repeat_interleave(config.tokens_per_cell, dim=1)[..., None]
    noise = torch.randn(tokens.shape, generator=generator)
    noisy = (1 - t_tokens) * tokens + t_tokens * noise
    # Every cell of every image in one call, image i in cache slot i; tokens are in cell order.
    cells = noisy.view(B * config.num_cells, config.tokens_per_cell, -1)
    velocity = model(cells, CellBatch.whole_images(labels, t), model.new_cache(B)).view(tokens.shape)
    return (velocity - (noise - tokens)).pow(2).mean()


def train(args: argparse.Namespace) -> XARTransformer:
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    config = PRESET.config
    tokens, labels = digits_as_tokens(config)
    model = XARTransformer(config)
    init_weights(model)
    ema = copy.deepcopy(model).requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    schedule = lambda step: min(1.0, (step + 1) / args.warmup) * 0.5 * (1 + math.cos(math.pi * step / args.steps))  # noqa: E731
    lr_schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)

    started = time.time()
    for step in range(args.steps):
        batch = torch.randint(len(tokens), (args.batch_size,), generator=generator)
        loss = flow_matching_loss(model, tokens[batch], labels[batch], generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        lr_schedule.step()
        with torch.no_grad():
            decay = min(args.ema, (step + 1) / (step + 10))  # a short warm-up so early EMA is not the init
            for e, p in zip(ema.parameters(), model.parameters()):
                e.lerp_(p, 1 - decay)
        if step % 100 == 0 or step == args.steps - 1:
            print(f"step {step:5d}  loss {loss.item():.4f}  {time.time() - started:6.0f} s", flush=True)
    return ema


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--ema", type=float, default=0.999)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (results depend on it)")
    parser.add_argument("--overwrite", action="store_true", help="replace the model already in --out (the bundled one by default)")
    args = parser.parse_args()
    existing = [str(args.out / name) for name in (WEIGHTS_NAME, CONFIG_NAME) if (args.out / name).exists()]
    if existing and not args.overwrite:  # checked before training, not after it
        parser.error(f"{', '.join(existing)} exist; pass --overwrite to replace them")
    torch.set_num_threads(args.threads)
    # Cells gather their position embeddings by index, whose backward sums the rows of all images at a
    # position; with several threads only the deterministic kernels keep a seed's weights identical.
    torch.use_deterministic_algorithms(True)
    written = save_model_folder(args.out, train(args), PRESET.num_inference_steps, PRESET.guidance_scale,
                                overwrite=args.overwrite, repo_id=PRESET_NAME)
    print(f"wrote {', '.join(str(args.out / name) for name in written)}")


if __name__ == "__main__":
    main()
