"""The method heads tune trains: each maps (B, D) image features to (B, C) logits.

All heads share one form, ``logits = scale * features @ weight.T + bias``, and expose it through
``classifier()`` so that training (one call per step) and evaluation (one call for all images)
compute the class weights once, never per sample:

- ``coop``, ``cls-tuning``, ``full-prompt``: :class:`PromptHead`, weight = the prompt learner's
  (C, D) normalised text features (one text-encoder pass over the class prompts), scale = the
  model's ``logit_scale.exp()``, no bias.
- ``linear-probe``: :class:`LinearHead` from zeros (logistic regression on the image features).
- ``classifier-zs``: :class:`LinearHead` initialised to ``logit_scale.exp() x`` the zero-shot class
  text embeddings, bias 0, so that it starts at the zero-shot logits.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from promptcli.errors import InputError
from promptcli.models.loading import LoadedModel

TEXT_METHODS = ("coop", "cls-tuning", "full-prompt")  # mirrors promptcli.models.prompt_learner.TEXT_METHODS
LINEAR_METHODS = ("linear-probe", "classifier-zs")
METHODS = TEXT_METHODS + LINEAR_METHODS


def check_method(method: str) -> str:
    if method not in METHODS:
        raise InputError(
            f"unknown method {method!r}", where="--method", hint="use one of: " + ", ".join(METHODS)
        )
    return method


def apply_classifier(features: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, scale: float):
    """scale * features @ weight.T (+ bias)."""
    logits = scale * features @ weight.t().to(features.dtype)
    return logits if bias is None else logits + bias.to(logits.dtype)


class LinearHead(nn.Module):
    """A linear classifier on image features: features @ weight.T + bias."""

    def __init__(
        self,
        dim: int,
        n_classes: int,
        method: str = "linear-probe",
        weight: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.method = method
        init = torch.zeros(n_classes, dim) if weight is None else weight.detach().float().clone().cpu()
        if init.shape != (n_classes, dim):
            raise ValueError(f"initial weight has shape {tuple(init.shape)}, expected {(n_classes, dim)}")
        self.weight = nn.Parameter(init)
        self.bias = nn.Parameter(torch.zeros(n_classes))

    def classifier(self) -> tuple[torch.Tensor, torch.Tensor | None, float]:
        return self.weight, self.bias, 1.0

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return apply_classifier(features, *self.classifier())

    def param_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """Weight decay on the weights only (the bias is not regularised, as in logistic regression)."""
        return [
            {"params": [self.weight], "weight_decay": weight_decay},
            {"params": [self.bias], "weight_decay": 0.0},
        ]

    def learnable_state(self) -> dict[str, torch.Tensor]:
        return {"weight": self.weight.detach().clone(), "bias": self.bias.detach().clone()}

    def load_learnable_state(self, tensors: dict[str, torch.Tensor]) -> None:
        missing = {"weight", "bias"} - set(tensors)
        if missing:
            raise InputError(
                f"tensor(s) {', '.join(sorted(missing))} missing", hint="is this a promptcli prompt?"
            )
        with torch.no_grad():
            self.weight.copy_(tensors["weight"])
            self.bias.copy_(tensors["bias"])


class PromptHead(nn.Module):
    """Logits from a prompt learner: logit_scale.exp() x features @ learner().T."""

    def __init__(self, learner: nn.Module, logit_scale: float, method: str) -> None:
        super().__init__()
        self.learner = learner
        self.logit_scale = float(logit_scale)
        self.method = method

    def classifier(self) -> tuple[torch.Tensor, torch.Tensor | None, float]:
        return self.learner(), None, self.logit_scale  # one text pass for all classes

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return apply_classifier(features, *self.classifier())

    def param_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        params = [p for p in self.learner.parameters() if p.requires_grad]
        return [{"params": params, "weight_decay": weight_decay}]

    def learnable_state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.learner.learnable_state().items()}

    def load_learnable_state(self, tensors: dict[str, torch.Tensor]) -> None:
        self.learner.load_learnable_state(tensors)


Head = LinearHead | PromptHead


def model_logit_scale(loaded: LoadedModel) -> float:
    return float(loaded.model.logit_scale.detach().float().exp().item())


def build_head(
    method: str,
    *,
    classnames: Sequence[str],
    dim: int,
    loaded: LoadedModel | None = None,
    prompt_config: Any = None,
    generator: torch.Generator | None = None,
) -> Head:
    """A freshly initialised head for ``method`` (prompt methods and classifier-zs need the model)."""
    check_method(method)
    if method == "linear-probe":
        return LinearHead(dim, len(classnames), method)
    if loaded is None:
        raise ValueError(f"method {method} needs the CLIP model")
    scale = model_logit_scale(loaded)
    if method == "classifier-zs":
        from promptcli.models.zeroshot import DEFAULT_TEMPLATE, class_text_embeddings

        template = getattr(prompt_config, "template", None) or DEFAULT_TEMPLATE
        text = class_text_embeddings(loaded, list(classnames), [template]).cpu()
        return LinearHead(dim, len(classnames), method, weight=scale * text)
    from promptcli.models.prompt_learner import PromptLearner

    learner = PromptLearner(loaded, list(classnames), prompt_config, generator=generator)
    return PromptHead(learner, scale, method)


@torch.no_grad()
def predict_logits(head: Head, features: torch.Tensor, batch: int = 8192) -> torch.Tensor:
    """(N, C) float32 logits, the class weights computed once for all images."""
    weight, bias, scale = head.classifier()
    weight = weight.float()
    out = [
        apply_classifier(
            features[i : i + batch].float(), weight, None if bias is None else bias.float(), scale
        )
        for i in range(0, len(features), batch)
    ]
    return torch.cat(out) if out else torch.zeros(0, weight.shape[0])
