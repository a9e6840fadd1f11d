"""What to prune and how: every pruning option is defined, defaulted and checked here, once.

The callback, the CLI (``--pruning.config.*``), the block walk and ``prune_weight`` all take
a ``PruneConfig``; the sparsity pattern is parsed once and travels as a ``Pattern``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal, get_args

import torch

from optima.errors import OptionError, check_choice  # noqa: F401  (users import OptionError from here)
from optima.masks import MASK_SELECTORS, Pattern, parse_pattern
from optima.model import LayerSelection
from optima.solver import SolverOptions
Mask = Literal["magnitude", "wanda", "sparsegpt", "sparsegpt-rowwise", "thanos", "admm"]
Update = Literal["none", "optima", "sparsegpt", "thanos", "admm"]
Precision = Literal["float32", "float64"]
Target = Literal["self", "dense"]
OWN_UPDATES = ("sparsegpt", "thanos", "admm")  # a selector's own update, made while it chooses the mask
assert get_args(Mask) == MASK_SELECTORS


@dataclass
class PruneConfig:
    """What to prune and how.

    Args:
        sparsity: Fraction of weights to zero in every pruned layer (unstructured), in (0, 1).
            An N:M pattern implies 1 - N/M: leave 0.5 for 2:4, set it to null (or the implied
            value) for other N:M.
        layer_sparsity: Per-layer ratios: regex on the layer name -> ratio. The first match
            wins; unmatched layers get ``sparsity``.
        layer_budgets: "uniform" (``sparsity`` everywhere, or ``layer_sparsity``) or "owl": OWL's
            outlier-weighted budgets, from one extra pass of the dense model (``optima.owl``):
            blocks whose Wanda scores hold more outliers are pruned less, block sparsities span
            2 * owl_lambda and average to ``sparsity``. Unstructured only.
        owl_lambda: OWL's Lambda: half the spread of the block budgets.
        owl_m: OWL's M: a score is an outlier above M times its block's mean score.
        pattern: "unstructured", or "N:M": at most N weights kept in every M consecutive inputs.
        mask: Which weights to zero: magnitude (|W|, one threshold per layer), wanda
            (|W| * ||x||, per row), sparsegpt (OBS saliency per column block, with its greedy
            update), sparsegpt-rowwise (the same, per row), thanos (block-wise OBS, per layer),
            admm (Boza's ADMM: the mask re-chosen per layer while ADMM moves the weights).
        update: How the kept weights move: none; optima (the exact per-row optimum);
            sparsegpt, thanos or admm (the selector's own update; needs that mask).
        damp: Relative damping: damp * mean(diag H) is added to the Hessian's diagonal.
        admm_damp: The admm selector's own relative damping (its reference's 0.1; ``damp`` stays
            the OPTIMA solve's).
        mask_block: Columns per lazy-update block of the sparsegpt and thanos selectors.
        sequential: Prune block by block, feeding each pruned block's outputs to the next
            (SparseGPT's scheme); false: every Hessian from one pass of the dense model.
        true_sequential: With sequential, also within a block: the layers are pruned group by group
            in the order they run (a Llama block: q/k/v, o, gate/up, down), each group's Hessian
            from the inputs the block's already pruned groups produce (SparseGPT's
            ``--true-sequential``); one calibration pass over the block per group.
        target: What each layer's update fits: "self", its own outputs on the inputs it receives
            from the pruned blocks before it, ``||X~ (W' - W)^T||`` (SparseGPT's and the paper's
            objective); "dense", the outputs the dense model produces there, ``||X~ W'^T - X W^T||``
            (error-correcting: the walk keeps a second, dense stream of block inputs). Needs
            sequential, true_sequential (each group fitted to the inputs the block's corrected
            groups produce) and an update.
        targets: Regexes; when given, only layers whose name matches one are pruned.
        ignore: Regexes of layer names left dense. Only layers inside the model's stack of
            blocks are ever pruned (embeddings and the LM head never are).
        skip_attention: Leave the attention projections dense.
        keep_row_range: With update=optima, keep every new weight within its row's original
            [min, max] (a box-constrained QP), so a later per-row absmax quantization keeps its scale.
        mask_rounds: With update=optima, rounds of mask refinement after the solve (``optima.refine``):
            swaps of a pruned for a kept weight within a row (or N:M group), each row re-solved
            exactly and kept only if its error drops. 0: the selector's mask as is.
        hessian_dtype: Precision in which H = X^T X is accumulated.
        solver: Options of the OPTIMA QP solver.
    """

    sparsity: float | None = 0.5
    layer_sparsity: dict[str, float] = field(default_factory=dict)
    layer_budgets: Literal["uniform", "owl"] = "uniform"
    owl_lambda: float = 0.08
    owl_m: float = 5.0
    pattern: str = "unstructured"
    mask: Mask = "wanda"
    update: Update = "optima"
    damp: float = 0.01
    admm_damp: float = 0.1
    mask_block: int = 128
    sequential: bool = True
    true_sequential: bool = False
    target: Target = "self"
    targets: list[str] = field(default_factory=list)
    ignore: list[str] = field(default_factory=list)
    skip_attention: bool = False
    keep_row_range: bool = False
    mask_rounds: int = 0
    hessian_dtype: Precision = "float32"
    solver: SolverOptions = field(default_factory=SolverOptions)

    def __post_init__(self) -> None:
        check_choice("mask", self.mask, get_args(Mask))
        check_choice("update", self.update, get_args(Update))
        check_choice("hessian_dtype", self.hessian_dtype, get_args(Precision))
        check_choice("target", self.target, get_args(Target))
        if self.true_sequential and not self.sequential:
            raise OptionError("true_sequential", "orders the layers within each block of the sequential walk: "
                                                 "needs sequential=True")
        if self.target == "dense":
            if not self.sequential:
                raise OptionError("target", "'dense' fits each layer to the dense model's outputs on the inputs "
                                            "of the pruned model, which only the sequential walk has: needs "
                                            "sequential=True")
            if not self.true_sequential:
                raise OptionError("target", "'dense' needs true_sequential=True: a layer calibrated before the "
                                            "block's earlier layers are pruned would be fitted to cancel an error "
                                            "that those layers' own dense targets already cancel, and the two "
                                            "corrections add up")
            if self.update == "none":
                raise OptionError("target", "'dense' changes what the update fits; with update='none' there is "
                                            "no update: choose one, or target='self'")
            if self.keep_row_range:
                raise OptionError("target", "'dense' moves every weight towards the dense model's outputs, not "
                                            "its own row; it cannot be combined with keep_row_range")
        if self.update in OWN_UPDATES and not self.mask.startswith(self.update):
            raise OptionError("update", f"{self.update!r} is {self.update}'s own update, made while it chooses "
                                        f"the mask: it needs mask={self.update!r}")
        if self.keep_row_range and (self.update != "optima" or self.solver.method == "direct"):
            raise OptionError("keep_row_range", "bounds the OPTIMA update: needs update='optima' and a solver "
                                                "method other than 'direct'")
        check_choice("layer_budgets", self.layer_budgets, ("uniform", "owl"))
        if self.layer_budgets == "owl":
            if self.pattern != "unstructured" or self.layer_sparsity:
                raise OptionError("layer_budgets", "'owl' sets every layer's sparsity itself: it needs the "
                                                   "unstructured pattern and no layer_sparsity")
            room = min(self.sparsity, 1 - self.sparsity) / 2 if isinstance(self.sparsity, float) else 0.25
            if not 0 <= self.owl_lambda < room:  # budgets lie within sparsity +- 2 lambda
                raise OptionError("owl_lambda", f"must be in [0, min(sparsity, 1 - sparsity) / 2) so that every "
                                                f"budget stays in (0, 1), got {self.owl_lambda}")
            if not self.owl_m > 0:
                raise OptionError("owl_m", f"must be > 0, got {self.owl_m}")
        if isinstance(self.mask_rounds, bool) or not isinstance(self.mask_rounds, int) or self.mask_rounds < 0:
            raise OptionError("mask_rounds", f"must be a whole number >= 0, got {self.mask_rounds!r}")
        if self.mask_rounds and self.update != "optima":
            raise OptionError("mask_rounds", "refines the mask by exact OPTIMA re-solves: needs update='optima'")
        if not self.damp >= 0:
            raise OptionError("damp", f"must be >= 0, got {self.damp}")
        if not self.admm_damp >= 0:
            raise OptionError("admm_damp", f"must be >= 0, got {self.admm_damp}")
        if self.mask_block < 1:
            raise OptionError("mask_block", f"must be a positive number of columns, got {self.mask_block}")
        for option, regexes in (("targets", self.targets), ("ignore", self.ignore), ("layer_sparsity", self.layer_sparsity)):
            for regex in regexes:
                try:
                    re.compile(regex)
                except re.error as err:
                    raise OptionError(option, f"bad regex {regex!r}: {err}") from None
        self._default = self._parse("sparsity", self.sparsity)
        self._per_layer = {regex: self._parse(f"layer_sparsity[{regex!r}]", value)
                           for regex, value in self.layer_sparsity.items()}

    def _parse(self, option: str, sparsity: float | None) -> Pattern:
        if sparsity is not None and (isinstance(sparsity, bool) or not isinstance(sparsity, (int, float))):
            raise OptionError(option, f"must be a number in (0, 1) or null, got {sparsity!r}")
        try:
            return parse_pattern(self.pattern, sparsity)
        except ValueError as err:
            raise OptionError("pattern" if "pattern" in str(err) else option, str(err)) from None

    def pattern_for(self, layer_name: str = "") -> Pattern:
        """The parsed pattern (with its sparsity) that applies to ``layer_name``."""
        for regex, pattern in self._per_layer.items():
            if re.search(regex, layer_name):
                return pattern
        return self._default

    @property
    def selection(self) -> LayerSelection:
        return LayerSelection(tuple(self.targets), tuple(self.ignore), self.skip_attention)

    @property
    def hessian_torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.hessian_dtype)
