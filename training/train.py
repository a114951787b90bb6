"""Train the bundled demo model: a tiny Mistral on `training/corpus.py`, on CPU torch, seeded.

    python -m training.train            # ~10 minutes on one core; writes mlx_mistral/demo_model*

The model is transformers' MistralForCausalLM (so the checkpoint has Mistral-7B-Instruct-v0.2's
config keys and tensor names) with the real v0.2 tokenizer and tied input/output embeddings.

Why training touches only the corpus's tokens: the corpus uses ~1150 of the 32000 token ids, and a
full softmax over 32000 would cost more than the whole transformer. Every other id keeps an
all-zero embedding row, so its logit is exactly 0; the loss adds those (32000 - active) zero
logits to the softmax's normaliser as one constant term, so it is the exact full-vocabulary
cross-entropy of the saved model, at the cost of a ~1200-way softmax. Only answer tokens (and the
closing `</s>`) are learned; the prompt is context. The random ids inside the model's tool calls
are not learned either: the server's grammar writes them, and a model trained to guess them
would only learn noise. It learns the tokens around them, so it closes a call after any id.

Determinism: one seed drives the initial weights and the data order; the data order is fixed
by the seed alone (no time, no threads), and torch runs with deterministic algorithms on a fixed
number of threads, so the loss curve is reproducible step for step.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mlx_mistral.tokenizer import Tokenizer
from training.corpus import SEED, encode_example, training_examples

REPO = Path(__file__).resolve().parent.parent
DEMO_DIR = REPO / "mlx_mistral" / "demo_model"
DEMO_4BIT_DIR = REPO / "mlx_mistral" / "demo_model_4bit"
LOG_NAME = "training_log.json"
THREADS = 1

# Mistral-7B-Instruct-v0.2's config, scaled down: same keys, GQA kept (2 KV heads for 4 heads).
MODEL_CONFIG: dict[str, Any] = {
    "vocab_size": 32000,
    "hidden_size": 128,
    "intermediate_size": 384,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "max_position_embeddings": 2048,
    "rope_theta": 1e4,
    "rms_norm_eps": 1e-5,
    "sliding_window": None,
    "tie_word_embeddings": True,
    "hidden_act": "silu",
    "bos_token_id": 1,
    "eos_token_id": 2,
}


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters; all of them go into the training log."""

    seed: int = SEED
    steps: int = 4000
    batch_size: int = 16
    lr: float = 1.5e-3
    warmup: int = 100
    min_lr_ratio: float = 0.05
    weight_decay: float = 0.01
    grad_clip: float = 1.0


def tokenizer_path() -> Path:
    """The real Mistral-7B-v0.2 tokenizer shipped in mistral-common."""
    import mistral_common

    return Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"


Encoded = tuple[list[int], int, tuple[int, ...]]  # (ids, prompt length, positions not learned)


def encoded_corpus(tokenizer: Tokenizer, seed: int) -> list[Encoded]:
    """(ids, prompt_length, unlearned positions) of every training example, in the corpus's
    fixed order."""
    return [encode_example(tokenizer, ex) for ex in training_examples(seed)]


def active_ids(corpus: list[Encoded], tokenizer: Tokenizer) -> list[int]:
    """The token ids that get trained embedding rows: every id the corpus uses, plus specials."""
    used = {t for ids, _, _ in corpus for t in ids}
    used.update((tokenizer.bos_id, tokenizer.eos_id, tokenizer.unk_id))
    return sorted(used)


def batches(corpus: list[Encoded], cfg: TrainConfig) -> Iterator[list[int]]:
    """Indices of each batch, forever: a seeded shuffle per epoch, similar lengths batched
    together (sorted within windows of 16 batches) to keep padding small."""
    rng = random.Random(cfg.seed)
    window = cfg.batch_size * 16
    while True:
        order = list(range(len(corpus)))
        rng.shuffle(order)
        for start in range(0, len(order), window):
            chunk = sorted(order[start : start + window], key=lambda i: (len(corpus[i][0]), i))
            group = [chunk[k : k + cfg.batch_size] for k in range(0, len(chunk), cfg.batch_size)]
            rng.shuffle(group)
            yield from group


def learning_rate(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to `min_lr_ratio * lr` at the last step."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (
        cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    )


class DemoTrainer:
    """The model being trained: the transformer blocks of a MistralForCausalLM, and the
    embedding rows of the active ids (the tied input/output matrix, all other rows zero)."""

    def __init__(self, cfg: TrainConfig, tokenizer: Tokenizer):
        from transformers import MistralConfig, MistralForCausalLM

        torch.set_num_threads(THREADS)
        torch.use_deterministic_algorithms(True)
        torch.manual_seed(cfg.seed)
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.corpus = encoded_corpus(tokenizer, cfg.seed)
        self.active = active_ids(self.corpus, tokenizer)
        self.hf = MistralForCausalLM(MistralConfig(**MODEL_CONFIG))
        self.hf.train()
        # The full embedding is not trained; its active rows live in `self.embed`.
        self.hf.model.embed_tokens.weight.requires_grad_(False)
        self.embed = torch.nn.Parameter(
            0.02 * torch.randn(len(self.active), MODEL_CONFIG["hidden_size"])
        )
        local = torch.full((MODEL_CONFIG["vocab_size"],), -1, dtype=torch.long)
        local[torch.tensor(self.active)] = torch.arange(len(self.active))
        self.local = local
        # log(number of zero rows): their logits are 0, so they add (V - A) * e^0 to the
        # softmax sum.
        self.zero_rows_logit = math.log(MODEL_CONFIG["vocab_size"] - len(self.active))
        blocks = [p for n, p in self.hf.named_parameters() if p.requires_grad]
        decay = [p for p in blocks if p.ndim >= 2] + [self.embed]
        no_decay = [p for p in blocks if p.ndim < 2]
        self.optimizer = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": cfg.weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=cfg.lr,
            betas=(0.9, 0.98),
            eps=1e-8,
            foreach=False,
        )
        self.params = decay + no_decay

    def batch_tensors(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(local input ids [B, T], local targets [B, T], loss mask [B, T]).

        Right padding needs no attention mask: causal attention never looks ahead at the pads."""
        rows = [self.corpus[i] for i in indices]
        width = max(len(ids) for ids, _, _ in rows) - 1
        inputs = torch.zeros((len(rows), width), dtype=torch.long)
        targets = torch.zeros((len(rows), width), dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.bool)
        for r, (ids, prompt_len, unlearned) in enumerate(rows):
            local = self.local[torch.tensor(ids)]
            n = len(ids) - 1
            inputs[r, :n] = local[:-1]
            targets[r, :n] = local[1:]
            mask[r, prompt_len - 1 : n] = True  # predict every answer token and the final </s>
            for position in unlearned:  # ...but not the call ids the server's grammar writes
                mask[r, position - 1] = False
        return inputs, targets, mask

    def loss(self, indices: list[int]) -> torch.Tensor:
        """Mean cross-entropy over the batch's answer tokens (exact over the full vocabulary)."""
        inputs, targets, mask = self.batch_tensors(indices)
        hidden = self.hf.model(inputs_embeds=self.embed[inputs]).last_hidden_state  # [B, T, D]
        picked = hidden[mask]  # [N, D]: answer positions only
        logits = picked @ self.embed.T  # [N, A]
        zero_rows = torch.full((logits.shape[0], 1), self.zero_rows_logit)
        normaliser = torch.logsumexp(torch.cat([logits, zero_rows], dim=1), dim=1)
        return (normaliser - logits.gather(1, targets[mask][:, None])[:, 0]).mean()

    def train(self, *, stop_after: int | None = None, log_every: int = 0) -> list[float]:
        """Run the schedule of `cfg.steps` steps (or only its first `stop_after`).

        Returns:
            The loss of every step.
        """
        losses: list[float] = []
        start = time.perf_counter()
        last = self.cfg.steps if stop_after is None else min(stop_after, self.cfg.steps)
        for step, indices in zip(range(last), batches(self.corpus, self.cfg)):
            for group in self.optimizer.param_groups:
                group["lr"] = learning_rate(step, self.cfg)
            loss = self.loss(indices)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip)
            self.optimizer.step()
            losses.append(loss.item())
            if log_every and (step + 1) % log_every == 0:
                recent = sum(losses[-log_every:]) / log_every
                print(
                    f"step {step + 1}/{last}  loss {recent:.4f}  "
                    f"{time.perf_counter() - start:.0f}s",
                    flush=True,
                )
        return losses

    def save_hf(self, out: Path) -> Path:
        """Save the trained model as transformers saves it, with the tokenizer beside it."""
        with torch.no_grad():
            full = torch.zeros_like(self.hf.model.embed_tokens.weight)
            full[torch.tensor(self.active)] = self.embed.detach()
            self.hf.model.embed_tokens.weight.copy_(full)
        self.hf.eval()
        self.hf.save_pretrained(out, safe_serialization=True)
        shutil.copy(tokenizer_path(), out / "tokenizer.model")
        return out


def build(
    cfg: TrainConfig, *, out: Path = DEMO_DIR, out_4bit: Path | None = DEMO_4BIT_DIR
) -> dict[str, Any]:
    """Train, save in the HF format, convert with `mlx_mistral.convert`, write the training log.

    Returns:
        The training log (also written to `out / training_log.json`).
    """
    from mlx_mistral.convert import convert

    tokenizer = Tokenizer.from_file(tokenizer_path())
    start = time.perf_counter()
    trainer = DemoTrainer(cfg, tokenizer)
    losses = trainer.train(log_every=100)
    seconds = time.perf_counter() - start
    log = {
        "seed": cfg.seed,
        "train_config": cfg.__dict__,
        "model_config": MODEL_CONFIG,
        "examples": len(trainer.corpus),
        "tokens": sum(len(ids) for ids, _, _ in trainer.corpus),
        "learned_tokens": sum(len(ids) - p - len(u) for ids, p, u in trainer.corpus),
        "active_ids": len(trainer.active),
        "threads": THREADS,
        "torch": torch.__version__,
        "train_seconds": round(seconds, 1),
        "final_loss": sum(losses[-50:]) / len(losses[-50:]),
        "losses": losses,
    }
    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = trainer.save_hf(Path(tmp) / "hf")
        convert(hf_dir, out, dtype="float16", force=True, progress=False)
        (out / LOG_NAME).write_text(json.dumps(log, indent=1) + "\n")
        if out_4bit is not None:
            convert(
                hf_dir,
                out_4bit,
                dtype="float16",
                quantize=True,
                bits=4,
                group_size=64,
                force=True,
                progress=False,
            )
            (out_4bit / LOG_NAME).write_text(json.dumps(log, indent=1) + "\n")
    return log


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--steps", type=int, default=TrainConfig.steps)
    parser.add_argument("--out", type=Path, default=DEMO_DIR)
    parser.add_argument("--out-4bit", type=Path, default=DEMO_4BIT_DIR)
    args = parser.parse_args(argv)
    log = build(TrainConfig(seed=args.seed, steps=args.steps), out=args.out, out_4bit=args.out_4bit)
    print(f"final loss {log['final_loss']:.4f} after {log['train_seconds']}s -> {args.out}")


if __name__ == "__main__":
    main()
