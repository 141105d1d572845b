"""Held-out evaluation of elastic, plain and sliced checkpoints, through one code path.

Data (`eval_data`): the validation split of the run that wrote the checkpoint, or any
indexed dataset (`--data PREFIX`, written by tools/preprocess_data.py with the
checkpoint's tokenizer), read whole, cut and shuffled as training's validation reads
`data.valid_prefixes` (same seed, same sequence length), so both give the same numbers.

Models (`evaluate_checkpoint`): an elastic checkpoint at each of its budgets (the hard-
masked full model, which equals the sliced model: the mask = slice invariant), a plain
checkpoint (a parent, a separately distilled baseline) as it is or hard-masked at another
checkpoint's budgets, a sliced checkpoint as the budget it was cut at, and a Hugging Face
directory (an export or a slice, BF16, FP8 or NVFP4: run as the quantized model it is)
as one row; every kind is opened by inference/loading.py, the generator's loading path. Each row gives
the loss (nats per predicted token), perplexity and bits per byte (the same loss per byte
of text, so byte and BPE tokenizers compare).

The evaluation table (`evaluate`) puts an elastic checkpoint's budgets next to the
same sizes sliced from the sorted parent (a) and prefix-sliced from the parent before
sorting (b).
"""

from __future__ import annotations

import json
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
import yaml

from elastic_megatron.checkpoint.metadata import checkpoint_model_config, read_common_state, require_same_architecture
from elastic_megatron.checkpoint.store import load_model_weights
from elastic_megatron.config.errors import ConfigError
from elastic_megatron.config.schema import split_blend
from elastic_megatron.inference.loading import open_for_inference
from elastic_megatron.data.datasets import heldout_dataset, load_tokenizer_for, make_loader, recorded_batches, require_prefix
from elastic_megatron.data.tokenizer import same_tokenizer
from elastic_megatron.elastic.budgets import checkpoint_budgets, recorded_budgets
from elastic_megatron.elastic.masks import ElasticHooks, hard_masks
from elastic_megatron.elastic.widths import Widths, full_widths, model_cost
from elastic_megatron.models.hybrid import build_model

LN2 = math.log(2.0)


@dataclass
class Scores:
    """Summed over the evaluated tokens: loss in nats, the tokens predicted and the bytes
    of text they stand for."""

    nats: float
    tokens: int
    bytes: int

    @property
    def loss(self) -> float:
        return self.nats / self.tokens

    @property
    def ppl(self) -> float:
        return math.exp(min(self.loss, 50))

    @property
    def bits_per_byte(self) -> float:
        return self.nats / LN2 / self.bytes if self.bytes else float("nan")

    def as_dict(self) -> dict:
        return {"loss": self.loss, "ppl": self.ppl, "bits_per_byte": self.bits_per_byte, "tokens": self.tokens, "bytes": self.bytes}


@dataclass
class EvalData:
    batches: list[dict]
    token_bytes: torch.Tensor  # [vocab]: UTF-8 bytes of text each token id stands for
    source: str  # what was evaluated, for the outputs
    seq_length: int


def _token_bytes(tokenizer, vocab_size: int) -> torch.Tensor:
    table = torch.zeros(vocab_size, dtype=torch.int64)
    counts = tokenizer.token_bytes()
    table[: len(counts)] = torch.tensor(counts, dtype=torch.int64)
    return table


def eval_data(checkpoint, data: Optional[str] = None, seq_length: Optional[int] = None, num_batches: Optional[int] = None,
              micro_batch_size: int = 8) -> EvalData:
    """The micro-batches to evaluate `checkpoint` on. `data` None: the validation split of
    the checkpoint's own run (`num_batches`, default 16). `data` a prefix: that dataset read
    whole with the checkpoint run's seed and `seq_length` (default: the run's), the first
    `num_batches` micro-batches or (None) one pass over it. Every check runs before any
    data are read; nothing is written but Megatron's index cache, in a temporary dir."""
    from megatron.core import parallel_state

    opened = open_for_inference(checkpoint)
    cfg, meta = opened.cfg, opened.meta
    job = yaml.safe_load(meta.get("config") or "{}") or {}
    recorded = (meta.get("data") or {}).get("tokenizer")
    if data is None:
        if "data" not in job:
            raise ConfigError("--data", None, f"{checkpoint} records no training data (a sliced or imported checkpoint); "
                                              "give --data PREFIX, a dataset made by tools/preprocess_data.py")
        if seq_length is not None:
            raise ConfigError("--seq-length", seq_length, "applies to --data; the run's own validation split is read at its sequence length")
        n = num_batches or 16
        tokenizer = load_tokenizer_for(split_blend(job["data"]["prefixes"], None)[0], job["data"].get("tokenizer"))
        return EvalData(recorded_batches(job, n, micro_batch_size), _token_bytes(tokenizer, cfg.vocab_size),
                        f"validation split of {checkpoint}'s data", job["data"]["seq_length"])
    require_prefix(data, "--data")
    try:
        tokenizer = load_tokenizer_for([data])
    except ConfigError as e:
        raise ConfigError("--data", data, e.allowed) from None
    if recorded is not None and not same_tokenizer(tokenizer.describe(), recorded):
        raise ConfigError("--data", data, f"was tokenized with {tokenizer.describe()}, but {checkpoint} was trained on "
                                          f"{recorded}; re-run tools/preprocess_data.py with the checkpoint's tokenizer")
    if tokenizer.vocab_size > cfg.vocab_size:
        raise ConfigError("--data", data, f"has a vocabulary of {tokenizer.vocab_size}, more than the model's {cfg.vocab_size}")
    seq = seq_length or (job.get("data") or {}).get("seq_length")
    if seq is None:
        raise ConfigError("--seq-length", None, f"{checkpoint} records no training sequence length; give --seq-length")
    if seq < 2:
        raise ConfigError("--seq-length", seq, "must be an integer >= 2")
    seed = (job.get("run") or {}).get("seed", 1234)
    with tempfile.TemporaryDirectory(prefix="eval-cache-") as cache:
        dataset = heldout_dataset(data, tokenizer, seq, seed, cache, num_batches * micro_batch_size if num_batches else None)
        n = num_batches or math.ceil(len(dataset) / micro_batch_size)
        loader = make_loader(dataset, 0, micro_batch_size, parallel_state.get_data_parallel_rank(), 1)
        batches = [next(loader) for _ in range(n)]
    if num_batches is None and n * micro_batch_size > len(dataset):  # one pass: the last micro-batch is partial
        keep = len(dataset) - (n - 1) * micro_batch_size
        batches[-1] = {k: v[:keep] for k, v in batches[-1].items()}
    return EvalData(batches, _token_bytes(tokenizer, cfg.vocab_size), f"{data} (held out, sequences of {seq})", seq)


def checkpoint_rows(path, names: Optional[list[str]] = None, key: str = "--budgets") -> list[tuple[str, Optional[Widths]]]:
    """What to evaluate in the checkpoint at `path`: (name, widths to hard-mask at) per
    elastic budget; a plain checkpoint is one row `full` (no masks), a sliced one the
    budget it was cut at, an HF directory one row `full`. `names` picks rows; an unknown
    name is a ConfigError."""
    meta = open_for_inference(path).meta
    if (meta.get("elastic") or {}).get("budgets"):
        rows = list(recorded_budgets(meta, path))
    elif meta.get("sliced_from"):
        rows = [(meta["sliced_from"]["size"], None)]
    else:
        rows = [("full", None)]
    if names:
        have = [n for n, _ in rows]
        for n in names:
            if n not in have:
                raise ConfigError(key, n, f"is not a budget of {path}; allowed: {have}")
        rows = [r for r in rows if r[0] in names]
    return rows


@torch.no_grad()
def score_budgets(model, cfg, budgets: list[tuple[str, Optional[Widths]]], data: EvalData) -> dict[str, Scores]:
    """Scores of `model` at each budget (hard masks at its widths; None = as it is)."""
    hooks = ElasticHooks(model, cfg) if any(w is not None for _, w in budgets) else None
    model.eval()
    out = {}
    try:
        for name, w in budgets:
            if hooks is not None:
                hooks.set(hard_masks(cfg, w) if w is not None else None)
            nats, tokens, nbytes = 0.0, 0, 0
            for b in data.batches:
                per_token = model(b["tokens"], b["position_ids"], None, labels=b["labels"]).double()
                mask = b["loss_mask"].to(per_token.dtype)
                nats += (per_token * mask).sum().item()
                tokens += int(mask.sum().item())
                nbytes += int((data.token_bytes[b["labels"].clamp(min=0)] * b["loss_mask"].long()).sum().item())
            out[name] = Scores(nats, tokens, nbytes)
    finally:
        if hooks is not None:
            hooks.remove()
    return out


def budget_losses(model, cfg, budgets: list[tuple[str, Widths]], batches: list[dict]) -> dict[str, float]:
    """Validation loss of `model` at each budget (hard masks) on `batches`."""
    data = EvalData(batches, torch.zeros(cfg.vocab_size, dtype=torch.int64), "", 0)
    return {name: s.loss for name, s in score_budgets(model, cfg, budgets, data).items()}


def evaluate_checkpoint(path, data: EvalData, budgets: Optional[list[tuple[str, Optional[Widths]]]] = None) -> dict[str, Scores]:
    """Scores of the checkpoint at `path` at its own rows (`checkpoint_rows`) or, for a
    parent of the same architecture, hard-masked at `budgets` (another checkpoint's)."""
    opened = open_for_inference(path)
    model = opened.load_model()
    return score_budgets(model, opened.cfg, budgets if budgets is not None else checkpoint_rows(path), data)


def row_params(cfg, widths: Optional[Widths]) -> tuple[int, int]:
    """(total, active) parameters of a row: the budget's, or the whole model's."""
    w = widths if widths is not None else full_widths(cfg)
    return int(model_cost(cfg, w, "total_params")), int(model_cost(cfg, w, "active_params"))


@dataclass
class EvalRow:
    budget: str
    model: str  # label: elastic, sorted, unsorted, or a checkpoint's name
    checkpoint: str
    total_params: int
    active_params: int
    scores: Scores
    widths: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"budget": self.budget, "model": self.model, "checkpoint": self.checkpoint, "total_params": self.total_params,
                "active_params": self.active_params, "widths": self.widths, **self.scores.as_dict()}


def evaluate(checkpoint, data: EvalData, names: Optional[list[str]] = None,
             baselines: Optional[dict[str, str]] = None) -> list[EvalRow]:
    """Rows of `checkpoint` (label `elastic` when it is elastic, else `model`) and of each
    baseline checkpoint (label -> path, same architecture) hard-masked at its budgets."""
    rows = checkpoint_rows(checkpoint, names)
    cfg = open_for_inference(checkpoint).cfg
    baselines = baselines or {}
    for label, path in baselines.items():
        require_same_architecture(cfg, path, f"--{label}")
        if any(w is None for _, w in rows):
            raise ConfigError(f"--{label}", path, f"baselines are masked at an elastic checkpoint's budgets; {checkpoint} is not elastic")
    own = "elastic" if any(w is not None for _, w in rows) else "model"
    params = {name: row_params(cfg, w) for name, w in rows}
    out = []
    for label, path in {own: str(checkpoint), **baselines}.items():
        scores = evaluate_checkpoint(path, data, rows)
        for name, w in rows:
            total, active = params[name]
            out.append(EvalRow(name, label, str(path), total, active, scores[name], w.as_dict() if w is not None else {}))
    return out


def render_rows(rows: list[EvalRow], source: str = "") -> str:
    head = f"{'budget':<10}{'total params':>14}{'active params':>15}  {'model':<10}{'loss':>9}{'ppl':>10}{'bits/byte':>11}"
    lines = ([f"held-out evaluation on {source}"] if source else []) + [head, "-" * len(head)]
    for r in rows:
        s = r.scores
        lines.append(f"{r.budget:<10}{r.total_params:>14,}{r.active_params:>15,}  {r.model:<10}{s.loss:>9.4f}{s.ppl:>10.3f}{s.bits_per_byte:>11.4f}")
    return "\n".join(lines)


def write_rows(rows: list[EvalRow], out_dir, source: str = "") -> tuple[Path, Path]:
    """evaluation.json and evaluation.png (held-out loss vs total parameters, one line per model)."""
    labels = {"elastic": "elastic (stage 1 + 2)", "sorted": "(a) sliced from sorted parent", "unsorted": "(b) prefix of unsorted parent"}

    def draw(ax):
        for label in dict.fromkeys(r.model for r in rows):
            mine = sorted((r for r in rows if r.model == label), key=lambda r: r.total_params)
            ax.plot([r.total_params for r in mine], [r.scores.loss for r in mine], marker="o", label=labels.get(label, label))
        for r in rows:
            if r.model == rows[0].model:
                ax.annotate(r.budget, (r.total_params, r.scores.loss), textcoords="offset points", xytext=(4, -10), fontsize=8)
        ax.set_xlabel("total parameters")
        ax.set_title("nested budgets: held-out loss vs size")

    return _write_json_and_png(out_dir, "evaluation", {"data": source, "rows": [r.as_dict() for r in rows]}, draw)


def validation_batches(path, num_batches: int, micro_batch_size: int, split: str = "valid") -> list[dict]:
    """Micro-batches of the data the run that wrote checkpoint `path` was trained on."""
    return recorded_batches(yaml.safe_load(read_common_state(path)["meta"]["config"]), num_batches, micro_batch_size, split)


def _write_json_and_png(out_dir, stem: str, payload: dict, draw, figsize=(6, 4)) -> tuple[Path, Path]:
    """<out_dir>/<stem>.json with `payload` and <stem>.png drawn by `draw(ax)` (Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / f"{stem}.json"
    json_path.write_text(json.dumps(payload, indent=2))
    fig, ax = plt.subplots(figsize=figsize)
    draw(ax)
    ax.set_ylabel("validation loss (nats/token)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    png_path = out_dir / f"{stem}.png"
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return json_path, png_path


# ---- budget x precision -----------------------------------------------------------------

PRECISION_COLUMNS = ("bf16", "fp8 PTQ", "nvfp4 PTQ", "nvfp4 QAD")


def evaluate_precisions(elastic_ckpt, data: EvalData, qad_ckpt=None, micro_batch_size: int = 8,
                        calibration_batches: int = 16) -> dict[str, dict[str, float]]:
    """budget -> column -> validation loss: the BF16 elastic checkpoint, FP8 and NVFP4
    post-training quantization of it (one set of scales calibrated at every budget on its
    training data), and the NVFP4 QAD checkpoint `qad_ckpt` with its own scales."""
    from elastic_megatron.quant.calibrate import calibrate_budgets
    from elastic_megatron.quant.hooks import QuantHooks, attach

    cfg, _ = checkpoint_model_config(elastic_ckpt)
    budgets = checkpoint_budgets(elastic_ckpt)
    batches = data.batches
    calibration = validation_batches(elastic_ckpt, calibration_batches, micro_batch_size, split="train")
    model = build_model(cfg)
    load_model_weights(elastic_ckpt, model)
    columns = {"bf16": budget_losses(model, cfg, budgets, batches)}
    for fmt in ("fp8", "nvfp4"):
        quant = QuantHooks(model, fmt, "aggressive")
        calibrate_budgets(model, cfg, quant, budgets, calibration)
        columns[f"{fmt} PTQ"] = budget_losses(model, cfg, budgets, batches)
        quant.remove()
    if qad_ckpt is not None:
        meta = require_same_architecture(cfg, qad_ckpt, "--qad")
        record = meta.get("quantization")
        if not record:
            raise ConfigError("--qad", str(qad_ckpt), "has no quantization scales: give the run dir of a QAD run (recipes/qad.yaml)")
        qad = build_model(cfg)
        load_model_weights(qad_ckpt, qad)
        attach(qad, record, record["format"], record["recipe"])
        columns[f"{record['format']} QAD"] = budget_losses(qad, cfg, budgets, batches)
    return {name: {c: columns[c][name] for c in columns} for name, _ in budgets}


def render_precision_table(table: dict[str, dict[str, float]]) -> str:
    cols = list(next(iter(table.values())))
    gaps = [c for c in ("nvfp4 PTQ", "nvfp4 QAD") if c in cols]
    head = f"{'budget':<10}" + "".join(f"{c + ' loss':>16}" for c in cols) + "".join(f"{c + ' - bf16':>18}" for c in gaps)
    lines = ["validation loss per budget and precision (one set of scales for every budget)", head, "-" * len(head)]
    for name, row in table.items():
        lines.append(f"{name:<10}" + "".join(f"{row[c]:>16.4f}" for c in cols) + "".join(f"{row[c] - row['bf16']:>+18.4f}" for c in gaps))
    return "\n".join(lines)


def write_precision_outputs(table: dict[str, dict[str, float]], out_dir) -> tuple[Path, Path]:
    """precision.json and precision.png (validation loss per budget, one bar per precision)."""
    cols = list(next(iter(table.values())))

    def draw(ax):
        width = 0.8 / len(cols)
        for j, c in enumerate(cols):
            ax.bar([i + j * width for i in range(len(table))], [row[c] for row in table.values()], width, label=c)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(table))], list(table))
        ax.set_ylim(bottom=min(v for row in table.values() for v in row.values()) * 0.95)
        ax.set_title("nested budgets x precision")

    return _write_json_and_png(out_dir, "precision", {"valid_loss": table}, draw, figsize=(7, 4))
