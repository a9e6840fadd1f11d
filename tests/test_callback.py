"""The OptimaPruning callback inside real Lightning fits of tiny transformers models (CPU, seconds)."""

from __future__ import annotations

import copy
import json
import re

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, Dataset
from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM

from optima.callbacks.pruning import OptimaPruning
from optima.config import OptionError, PruneConfig
from optima.model import weight_rows
from optima.solver import SolverOptions

VOCAB, SEQ = 64, 16
LLAMA_LOCAL = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
OPT_LOCAL = ("self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj", "self_attn.out_proj", "fc1", "fc2")

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")


# ---------------------------------------------------------------------------------------- helpers
def tiny_llama(seed: int = 0, layers: int = 2, intermediate: int = 64, vocab: int = VOCAB) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=intermediate,
                                        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                        max_position_embeddings=64))


def tiny_opt(seed: int = 0) -> OPTForCausalLM:
    torch.manual_seed(seed)
    return OPTForCausalLM(OPTConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, ffn_dim=64,
                                    num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=32))


def tiny_bert(seed: int = 0) -> BertModel:
    torch.manual_seed(seed)
    return BertModel(BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                intermediate_size=64, max_position_embeddings=64))


def llama_names(layers: int = 2) -> list[str]:
    return [f"model.layers.{i}.{local}" for i in range(layers) for local in LLAMA_LOCAL]


class TokenData(Dataset):
    """Random token sequences; counts reads, so a test can tell whether any data was touched."""

    def __init__(self, n: int = 32, seed: int = 1, vocab: int = VOCAB) -> None:
        self.ids = torch.randint(0, vocab, (n, SEQ), generator=torch.Generator().manual_seed(seed))
        self.reads = 0

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        self.reads += 1
        return {"input_ids": self.ids[i]}


def loader(data: Dataset | None = None, batch_size: int = 4) -> DataLoader:
    return DataLoader(data if data is not None else TokenData(), batch_size=batch_size)


class Wrapper(pl.LightningModule):
    """The minimal LightningModule a user would write around a transformers model."""

    def __init__(self, model: nn.Module, lr: float = 0.05) -> None:
        super().__init__()
        self.model = model
        self.lr = lr

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        ids = batch["input_ids"]
        out = self.model(input_ids=ids)
        if hasattr(out, "logits"):
            return nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, out.logits.shape[-1]),
                                               ids[:, 1:].reshape(-1))
        return out.last_hidden_state.pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.model.parameters(), lr=self.lr)


def make_trainer(callbacks: list, **kwargs) -> pl.Trainer:
    options = dict(max_epochs=0, accelerator="cpu", logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    options.update(kwargs)
    return pl.Trainer(callbacks=callbacks, **options)


CALLBACK_ARGS = ("calibration_samples", "report_path", "resume_dir", "execution_device", "progress", "forward")


def callback(solver: dict | None = None, **options) -> OptimaPruning:
    """An OptimaPruning (eager CG, no progress display, 16 calibration sequences).

    ``options`` are OptimaPruning's own arguments or ``PruneConfig`` fields; ``solver`` holds
    ``SolverOptions`` fields.
    """
    args = {"progress": False, "calibration_samples": 16, **{k: v for k, v in options.items() if k in CALLBACK_ARGS}}
    config = PruneConfig(solver=SolverOptions(**{"compile": False, **(solver or {})}),
                         **{k: v for k, v in options.items() if k not in CALLBACK_ARGS})
    return OptimaPruning(config, **args)


def prune(model: nn.Module, data: Dataset | None = None, **options) -> OptimaPruning:
    """Fit with ``max_epochs=0``: prune only."""
    cb = callback(**options)
    make_trainer([cb]).fit(Wrapper(model), loader(data))
    return cb


def assert_pattern(weight: torch.Tensor, pattern: str = "unstructured", sparsity: float = 0.5) -> None:
    """Exact zeros per row (unstructured) or per group of M (N:M)."""
    rows, d_in = weight.shape
    zeros = weight == 0
    if pattern == "unstructured":
        counts = zeros.sum(1)
        assert (counts == int(sparsity * d_in)).all(), f"zeros per row {counts.unique().tolist()}"
    else:
        n, m = map(int, pattern.split(":"))
        assert (zeros.reshape(rows, d_in // m, m).sum(-1) == m - n).all()


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


class Snapshot(pl.Callback):
    """Copies the weights when training starts, i.e. right after pruning."""

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.weights = snapshot(pl_module.model)


def layer_hessian(model: nn.Module, name: str, batches: list[torch.Tensor]) -> torch.Tensor:
    """X^T X / tokens of a layer's inputs, recomputed independently in float64."""
    xs = []
    handle = model.get_submodule(name).register_forward_pre_hook(
        lambda _m, args: xs.append(args[0].detach().reshape(-1, args[0].shape[-1]).double()))
    try:
        with torch.no_grad():
            model.eval()
            for ids in batches:
                model(input_ids=ids, use_cache=False)
    finally:
        handle.remove()
    x = torch.cat(xs)
    return x.T @ x / x.shape[0]


# ------------------------------------------------------------------------------ sparsity / pattern
@pytest.mark.parametrize("arch", ["llama", "opt"])
@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_every_targeted_layer_gets_the_pattern(arch, pattern, tmp_path):
    model = tiny_llama() if arch == "llama" else tiny_opt()
    dense = snapshot(model)
    cb = prune(model, pattern=pattern, report_path=str(tmp_path / "report.json"))
    prefix, local = ("model.layers", LLAMA_LOCAL) if arch == "llama" else ("model.decoder.layers", OPT_LOCAL)
    expected = {f"{prefix}.{i}.{name}" for i in range(2) for name in local}
    assert set(cb.masks) == expected
    for name in expected:
        w = weight_rows(model.get_submodule(name)).detach()
        assert_pattern(w, pattern)
        assert torch.equal(cb.masks[name], w != 0)          # the mask is exactly the zero set
        kept = cb.masks[name]
        assert not torch.equal(w[kept], dense[f"{name}.weight"][kept])  # OPTIMA moved the survivors
    untouched = [k for k in dense if not any(k.startswith(n + ".") for n in expected)]
    assert untouched and all(torch.equal(model.state_dict()[k], dense[k]) for k in untouched)
    report = json.loads((tmp_path / "report.json").read_text())
    assert [r["layer"] for r in report["layers"]] == [n for n in cb.masks]
    assert all(r["sparsity"] == 0.5 and r["target_sparsity"] == 0.5 for r in report["layers"])
    assert report["summary"]["sparsity"] == 0.5
    assert report["config"]["pattern"] == pattern


def test_calibration_uses_exactly_the_requested_sequences():
    model = tiny_llama()
    cb = prune(model, calibration_samples=10)  # batches of 4: 4 + 4 + 2 (last one trimmed)
    assert {r.tokens for r in cb.report.layers} == {10 * SEQ}


def test_fewer_sequences_than_asked_warns_and_uses_them_all():
    model = tiny_llama()
    cb = callback(calibration_samples=16)
    with pytest.warns(UserWarning, match=r"calibration asked for 16 sequences \(this process\), the train dataloader gave 8"):
        make_trainer([cb]).fit(Wrapper(model), loader(TokenData(n=8)))
    assert {r.tokens for r in cb.report.layers} == {8 * SEQ}
    for name in cb.masks:
        assert_pattern(weight_rows(model.get_submodule(name)).detach())


# ------------------------------------------------------------------------------ sparse fine-tuning
def test_masks_hold_through_fine_tuning():
    model = tiny_llama()
    cb, snap = callback(), Snapshot()
    trainer = make_trainer([cb, snap], max_epochs=None, max_steps=3)
    trainer.fit(Wrapper(model, lr=0.05), loader())
    assert trainer.global_step == 3
    # the gradient does reach pruned weights, so without re-masking they would move
    ids = TokenData().ids[:4]
    model.zero_grad()
    model(input_ids=ids, labels=ids).loss.backward()
    grads_on_pruned = [float(model.get_submodule(n).weight.grad[~k].abs().max()) for n, k in cb.masks.items()]
    assert max(grads_on_pruned) > 0
    for name, keep in cb.masks.items():
        after = model.get_submodule(name).weight.detach()
        before = snap.weights[f"{name}.weight"]
        assert torch.equal(before == 0, ~keep)                  # pruned before training started
        assert (after[~keep] == 0).all()                        # still exactly zero after 3 steps
        assert (after[keep] != before[keep]).float().mean() > 0.9  # while the kept weights trained
        assert_pattern(after)


def test_masks_survive_checkpoint_and_resume_does_not_prune_again(tmp_path, monkeypatch):
    model = tiny_llama(seed=0)
    cb = callback()
    ckpt_cb = ModelCheckpoint(dirpath=tmp_path, save_last=True, every_n_train_steps=3)
    first = make_trainer([cb, ckpt_cb], max_epochs=None, max_steps=3, enable_checkpointing=True)
    first.fit(Wrapper(model), loader())
    ckpt = torch.load(ckpt_cb.last_model_path, weights_only=False)
    assert ckpt["global_step"] == 3
    saved_masks = ckpt["callbacks"]["OptimaPruning"]["masks"]
    assert set(saved_masks) == set(llama_names())
    assert all(torch.equal(saved_masks[n], cb.masks[n]) for n in saved_masks)

    calls = []
    real_prune = OptimaPruning.prune
    monkeypatch.setattr(OptimaPruning, "prune", lambda self, *a, **k: calls.append(1) or real_prune(self, *a, **k))
    fresh = tiny_llama(seed=7)                       # different weights: everything must come from the checkpoint
    resumed_cb, snap = callback(), Snapshot()
    second = make_trainer([resumed_cb, snap], max_epochs=None, max_steps=6)
    second.fit(Wrapper(fresh), loader(), ckpt_path=ckpt_cb.last_model_path)
    assert calls == []                                # no second pruning
    assert second.global_step == 6
    assert set(resumed_cb.masks) == set(saved_masks)
    for name, keep in resumed_cb.masks.items():
        assert torch.equal(keep.cpu(), saved_masks[name])
        start = snap.weights[f"{name}.weight"]
        assert (ckpt["state_dict"][f"model.{name}.weight"][~keep] == 0).all()  # the checkpoint holds the zeros
        assert torch.equal(start, ckpt["state_dict"][f"model.{name}.weight"])  # resumed from the checkpoint
        after = fresh.get_submodule(name).weight.detach()
        assert (after[~keep] == 0).all()
        assert not torch.equal(after[keep], start[keep])  # training went on for 3 more steps


# ------------------------------------------------------------------------------ sequential vs one pass
def test_sequential_and_one_pass_are_both_valid_and_differ():
    layers = 3
    original = tiny_llama(layers=layers)
    seq_model, flat_model = copy.deepcopy(original), copy.deepcopy(original)
    seq = prune(seq_model, sequential=True)
    flat = prune(flat_model, sequential=False)
    names = llama_names(layers)
    assert list(seq.masks) == list(flat.masks) == names
    for name in names:
        for m in (seq_model, flat_model):
            assert_pattern(weight_rows(m.get_submodule(name)).detach())
    # block 0 sees the same dense inputs in both modes: identical result
    for name in names[:7]:
        assert torch.equal(seq_model.get_submodule(name).weight, flat_model.get_submodule(name).weight)
    # later blocks: sequential calibrates on the outputs of the pruned blocks before them
    assert any(not torch.equal(seq_model.get_submodule(n).weight, flat_model.get_submodule(n).weight)
               for n in names[7:])
    batches = [TokenData().ids[i:i + 4] for i in range(0, 16, 4)]
    hybrid = copy.deepcopy(original)            # block 0 pruned (as sequential saw it), block 1 dense
    hybrid.model.layers[0].load_state_dict(seq_model.model.layers[0].state_dict())
    for cb, reference in ((seq, hybrid), (flat, original)):
        records = {r.name: r for r in cb.report.layers}
        for local in LLAMA_LOCAL:
            name = f"model.layers.1.{local}"
            h = layer_hessian(reference, name, batches)
            w = original.get_submodule(name).weight.detach().double()
            removed = w * ~cb.masks[name]
            expected = float((removed * (removed @ h)).sum())
            assert records[name].stats.objective_none == pytest.approx(expected, rel=1e-4)
    assert seq.report.layers[7].stats.objective_none != pytest.approx(flat.report.layers[7].stats.objective_none,
                                                                      rel=1e-3)


# ------------------------------------------------------------------------------ reconstruction quality
def test_optima_lowers_every_layer_error_and_beats_wanda_alone(tmp_path):
    original = tiny_llama(layers=3)
    models = {u: copy.deepcopy(original) for u in ("optima", "none")}
    reports = {}
    for update, model in models.items():
        path = tmp_path / f"{update}.json"
        prune(model, update=update, report_path=str(path))
        reports[update] = json.loads(path.read_text())
    optima, none = reports["optima"]["layers"], reports["none"]["layers"]
    assert [r["layer"] for r in optima] == [r["layer"] for r in none] == llama_names(3)
    for r in optima:
        assert r["objective"] <= r["objective_none"]
        assert r["relative_error"] == pytest.approx(r["objective"] / r["dense_energy"])
        assert not r["fell_back_to_none"] and r["unconverged_rows"] == 0
    strictly = sum(r["objective"] < 0.99 * r["objective_none"] for r in optima)
    assert strictly >= 0.9 * len(optima)
    for r in none:
        assert r["objective"] == r["objective_none"]
    # block 0: same Hessians, same Wanda mask; only the update differs
    for a, b in zip(optima[:7], none[:7]):
        assert a["objective_none"] == pytest.approx(b["objective_none"], rel=1e-9)
        assert a["objective"] < b["objective"]
    mean_optima = reports["optima"]["summary"]["mean_relative_error"]
    mean_none = reports["none"]["summary"]["mean_relative_error"]
    assert mean_optima < 0.9 * mean_none
    assert mean_none == pytest.approx(sum(r["relative_error"] for r in none) / len(none))


@pytest.mark.parametrize("mask, other", [("sparsegpt", "sparsegpt"), ("magnitude", "none")])
def test_optima_is_never_worse_than_another_update_on_the_same_mask(mask, other):
    original = tiny_llama()
    best, alt = copy.deepcopy(original), copy.deepcopy(original)
    a = prune(best, mask=mask, update="optima")
    b = prune(alt, mask=mask, update=other)
    for name in llama_names()[:7]:                           # block 0: identical Hessian and mask
        assert torch.equal(a.masks[name], b.masks[name])
    for ra, rb in zip(a.report.layers[:7], b.report.layers[:7]):
        assert ra.stats.objective <= rb.stats.objective * (1 + 1e-6)
        assert ra.stats.objective < rb.stats.objective_none


def test_pcg_solver_path_matches_direct():
    original = tiny_llama(layers=1)
    direct, iterative = copy.deepcopy(original), copy.deepcopy(original)
    a = prune(direct, solver={"method": "direct"})
    b = prune(iterative, solver={"method": "pcg", "tol": 1e-8, "dtype": "float64"})
    assert {r.stats.solver_method for r in b.report.layers} == {"pcg"}
    for ra, rb in zip(a.report.layers, b.report.layers):
        assert rb.stats.objective == pytest.approx(ra.stats.objective, rel=1e-4)
    for name in a.masks:
        assert torch.equal(a.masks[name], b.masks[name])
        torch.testing.assert_close(iterative.get_submodule(name).weight, direct.get_submodule(name).weight,
                                   rtol=1e-3, atol=1e-5)


# ------------------------------------------------------------------------------ layer selection
@pytest.mark.parametrize("options, chosen", [
    ({"skip_attention": True}, lambda n: ".mlp." in n),
    ({"ignore": ["down_proj"]}, lambda n: not n.endswith("down_proj")),
    ({"targets": [r"layers\.1\."]}, lambda n: ".layers.1." in n),
    ({"targets": ["q_proj", "up_proj"], "ignore": [r"layers\.0\."]},
     lambda n: n in ("model.layers.1.self_attn.q_proj", "model.layers.1.mlp.up_proj")),
])
def test_selection_prunes_exactly_the_chosen_layers(options, chosen):
    model = tiny_llama()
    dense = snapshot(model)
    cb = prune(model, **options)
    expected = [n for n in llama_names() if chosen(n)]
    assert list(cb.masks) == expected
    assert [r.name for r in cb.report.layers] == expected
    for name in llama_names():
        w = model.get_submodule(name).weight.detach()
        if name in expected:
            assert_pattern(w)
        else:
            assert torch.equal(w, dense[f"{name}.weight"])
    assert torch.equal(model.lm_head.weight, dense["lm_head.weight"])


def test_per_layer_sparsity_dict():
    model = tiny_llama()
    layer_sparsity = {r"mlp\.": 0.75, r"self_attn\.(q|k)_proj": 0.25}
    cb = prune(model, layer_sparsity=layer_sparsity)   # unmatched layers: sparsity (default 0.5)
    expected = {"q_proj": 0.25, "k_proj": 0.25, "v_proj": 0.5, "o_proj": 0.5,  # v, o: default 0.5
                "gate_proj": 0.75, "up_proj": 0.75, "down_proj": 0.75}
    assert len(cb.report.layers) == 14
    for record in cb.report.layers:
        target = expected[record.name.rsplit(".", 1)[1]]
        assert record.target_sparsity == target
        assert record.stats.sparsity == target
        assert_pattern(model.get_submodule(record.name).weight.detach(), sparsity=target)


def test_bert_skip_attention_keeps_only_feed_forward():
    model = tiny_bert()
    dense = snapshot(model)
    cb = prune(model, skip_attention=True)
    assert list(cb.masks) == [f"encoder.layer.{i}.{n}" for i in range(2) for n in ("intermediate.dense",
                                                                                  "output.dense")]
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            w = module.weight.detach()
            if name in cb.masks:
                assert_pattern(w)
            else:
                assert torch.equal(w, dense[f"{name}.weight"]), name


# ------------------------------------------------------------------------------ bad input, caught early
@pytest.mark.parametrize("options, option, fragment", [
    ({"sparsity": 0.0}, "sparsity", "sparsity must be in (0, 1)"),
    ({"sparsity": 1.0}, "sparsity", "sparsity must be in (0, 1)"),
    ({"sparsity": 1.5}, "sparsity", "sparsity must be in (0, 1)"),
    ({"sparsity": -0.1}, "sparsity", "sparsity must be in (0, 1)"),
    ({"sparsity": None}, "sparsity", "sparsity must be in (0, 1)"),
    ({"layer_sparsity": {"mlp": 1.2}}, "layer_sparsity['mlp']", "sparsity must be in (0, 1)"),
    ({"pattern": "2-4"}, "pattern", "unknown pattern '2-4'"),
    ({"pattern": "4:2"}, "pattern", "needs 0 < N < M"),
    ({"pattern": "2:4", "sparsity": 0.3}, "pattern", "implies sparsity 0.5"),
    ({"mask": "random"}, "mask", "got 'random'; choose from"),
    ({"update": "obs"}, "update", "got 'obs'; choose from"),
    ({"mask": "wanda", "update": "sparsegpt"}, "update", "needs mask='sparsegpt'"),
    ({"mask": "magnitude", "update": "sparsegpt"}, "update", "needs mask='sparsegpt'"),
    ({"keep_row_range": True, "update": "none"}, "keep_row_range", "needs update='optima'"),
    ({"targets": ["("]}, "targets", "bad regex '('"),
    ({"calibration_samples": 0}, "pruning.calibration_samples", "must be >= 1"),   # named as on the CLI
    ({"solver": {"dtype": "float16"}}, "solver.dtype", "got 'float16'; choose from"),
])
def test_bad_options_fail_at_construction(options, option, fragment):
    with pytest.raises(OptionError, match=re.escape(fragment)) as caught:
        callback(**options)
    assert caught.value.option == option and str(caught.value).startswith(f"{option}: ")


def test_the_callback_keeps_its_own_copy_of_the_config_and_the_run_options():
    config = PruneConfig(sparsity=0.6, sequential=False, ignore=["down_proj"])
    cb = OptimaPruning(config, resume_dir="ckpt", execution_device="cpu", progress=False)
    assert cb.config == config and cb.config is not config                   # later edits to config do not leak in
    config.ignore.append("up_proj")
    assert cb.config.ignore == ["down_proj"] and not cb.config.sequential
    assert cb.run_options.resume_dir == "ckpt" and cb.run_options.execution_device == "cpu"
    first, second = OptimaPruning(), OptimaPruning()    # the shared default config is copied too
    first.config.ignore.append("q_proj")
    assert second.config == PruneConfig() and second.config.ignore == []


class ConvBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(8, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x)


class ConvNet(nn.Module):
    """A model without a single nn.Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 8)
        self.blocks = nn.ModuleList(ConvBlock() for _ in range(2))

    def forward(self, input_ids: torch.Tensor):
        x = self.embed(input_ids).transpose(1, 2)
        for block in self.blocks:
            x = block(x)
        return type("Out", (), {"last_hidden_state": x})()


@pytest.mark.parametrize("make_model, options, fragment", [
    (lambda: tiny_llama(intermediate=36), {"pattern": "4:8"}, "4:8 needs d_in divisible by 8, got 36"),
    (lambda: tiny_llama(), {"pattern": "1:3", "sparsity": None}, "1:3 needs d_in divisible by 3, got 32"),
    (ConvNet, {}, "no stack of blocks with linear layers found in ConvNet"),
    (lambda: tiny_llama(), {"targets": ["no_such_layer"]}, "no linear layer matches"),
    (lambda: tiny_llama(), {"skip_attention": True, "ignore": ["mlp"]}, "no linear layer matches"),
])
def test_bad_model_fails_before_touching_data(make_model, options, fragment):
    model = make_model()
    dense = snapshot(model)
    data = TokenData()
    with pytest.raises(ValueError, match=re.escape(fragment)):
        make_trainer([callback(**options)]).fit(Wrapper(model), loader(data))
    assert data.reads == 0
    assert all(torch.equal(v, dense[k]) for k, v in model.state_dict().items())


def test_empty_calibration_set():
    model = tiny_llama()
    dense = snapshot(model)
    with pytest.raises(ValueError, match=re.escape("the calibration set (train dataloader) is empty")):
        make_trainer([callback()]).fit(Wrapper(model), loader(TokenData(n=0)))
    assert all(torch.equal(v, dense[k]) for k, v in model.state_dict().items())


def test_no_train_dataloader():
    model = tiny_llama()
    with pytest.raises(ValueError, match="calibrates on the fit's train dataloader, and there is none"):
        make_trainer([callback()], limit_train_batches=0).fit(Wrapper(model), loader())

