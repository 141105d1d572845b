"""Training entry point: `python -m elastic_megatron.train [recipe overrides]`.

Current scope (foundation): build the hybrid model from a preset on this rank and train it
for a few steps on the embedded corpus (Python standard-library bytes) with AdamW, then
report validation loss against the corpus' unigram entropy. The full pipeline (indexed
datasets, Megatron optimizer, checkpoints, W&B, Slurm) builds on this loop.
"""

from __future__ import annotations

import math
import time

import hydra
import torch
from omegaconf import DictConfig

from elastic_megatron.config.errors import ConfigError
from elastic_megatron.config.loading import load_model_config
from elastic_megatron.data.stdlib_corpus import stdlib_bytes, unigram_entropy_nats
from elastic_megatron.models.counter import model_size
from elastic_megatron.models.hybrid import build_model
from elastic_megatron.parallel.setup import distributed


def _check_trainer(t: DictConfig) -> None:
    for key in ("max_steps", "micro_batch_size", "seq_length", "eval_batches", "log_interval"):
        value = t[key]
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ConfigError(f"trainer.{key}", value, "must be a positive integer")
    if not t.lr > 0:
        raise ConfigError("trainer.lr", t.lr, "must be a positive number")


def random_windows(tokens: torch.Tensor, batch: int, seq: int, gen: torch.Generator) -> torch.Tensor:
    """`batch` windows of seq+1 tokens at random offsets (inputs and shifted labels)."""
    starts = torch.randint(0, tokens.numel() - seq - 1, (batch,), generator=gen)
    return torch.stack([tokens[s : s + seq + 1] for s in starts.tolist()]).long()


def lm_loss(model, window: torch.Tensor) -> torch.Tensor:
    inputs, labels = window[:, :-1], window[:, 1:]
    positions = torch.arange(inputs.shape[1], device=inputs.device).expand_as(inputs)
    return model(inputs, positions, None, labels=labels).mean()


@torch.no_grad()
def evaluate(model, tokens: torch.Tensor, t: DictConfig, seed: int) -> float:
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    losses = [lm_loss(model, random_windows(tokens, t.micro_batch_size, t.seq_length, gen)).item() for _ in range(t.eval_batches)]
    model.train()
    return sum(losses) / len(losses)


def run(cfg: DictConfig) -> dict:
    model_cfg = load_model_config(cfg.model)
    t = cfg.trainer
    _check_trainer(t)
    if model_cfg.vocab_size < 256:
        raise ConfigError("model.vocab_size", model_cfg.vocab_size, "the byte-level embedded corpus needs >= 256")

    with distributed(seed=t.seed):
        corpus = stdlib_bytes(cfg.data.max_bytes)
        split = int(corpus.numel() * (1 - cfg.data.valid_fraction))
        train_tokens, valid_tokens = corpus[:split], corpus[split:]
        model = build_model(model_cfg)
        size = model_size(model_cfg)
        print(f"model {model_cfg.name}: {size.total_params:,} params ({size.active_params:,} active), pattern {model_cfg.hybrid_pattern}")
        print(f"data: {corpus.numel():,} bytes of Python stdlib source ({train_tokens.numel():,} train / {valid_tokens.numel():,} valid)")

        opt = torch.optim.AdamW(model.parameters(), lr=t.lr, betas=(0.9, 0.95), weight_decay=0.1)
        gen = torch.Generator().manual_seed(t.seed)
        history, start = [], time.time()
        for step in range(1, t.max_steps + 1):
            loss = lm_loss(model, random_windows(train_tokens, t.micro_batch_size, t.seq_length, gen))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            history.append(loss.item())
            if step % t.log_interval == 0 or step == t.max_steps:
                tok_s = step * t.micro_batch_size * t.seq_length / (time.time() - start)
                print(f"step {step:>5}/{t.max_steps}  loss {loss.item():.4f}  {tok_s:,.0f} tok/s")
        val = evaluate(model, valid_tokens, t, seed=t.seed + 1)
        entropy = unigram_entropy_nats(valid_tokens, 256)
        print(f"validation loss {val:.4f} (perplexity {math.exp(val):.2f}); unigram entropy of the data {entropy:.4f} nats")
        return {"train_losses": history, "valid_loss": val, "unigram_entropy": entropy}


@hydra.main(config_path="../recipes", config_name="pretrain", version_base=None)
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
