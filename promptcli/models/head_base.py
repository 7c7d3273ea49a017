"""The two basic heads: a linear classifier on image features and logits from a prompt learner.

The other methods' heads (models/kgcoop.py, cocoop.py, clip_adapter.py, tip_adapter.py) build on these;
models/heads.py registers them all.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from promptcli.errors import InputError
from promptcli.models.head_parts import check_state
from promptcli.models.zeroshot import logit_scale as model_logit_scale


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
        self.template: str | None = None  # classifier-zs: the template of its zero-shot start

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

    needs_model = False  # a linear head is rebuilt from its tensors alone

    def file_metadata(self) -> dict[str, Any]:
        """What this head adds to its file's metadata (besides the run's provenance)."""
        return {} if self.template is None else {"template": self.template}

    @classmethod
    def from_tensors(
        cls, method: str, tensors: dict[str, torch.Tensor], metadata: dict[str, Any], loaded: Any
    ) -> LinearHead:
        weight = tensors.get("weight")
        if weight is None or weight.ndim != 2:
            raise InputError("tensor 'weight' missing or not 2-D", hint="is this a promptcli prompt?")
        # the file's class list and feature width, not the weight, say what the head must be
        classnames = metadata.get("classnames")
        n_classes = len(classnames) if isinstance(classnames, list) else weight.shape[0]
        dim = metadata.get("embed_dim", weight.shape[1])
        head = cls(dim if isinstance(dim, int) else weight.shape[1], n_classes, method)
        head.load_learnable_state(tensors)
        return head

    def load_learnable_state(self, tensors: dict[str, torch.Tensor]) -> None:
        missing = {"weight", "bias"} - set(tensors)
        if missing:
            raise InputError(
                f"tensor(s) {', '.join(sorted(missing))} missing", hint="is this a promptcli prompt?"
            )
        mine = {"weight": tuple(self.weight.shape), "bias": tuple(self.bias.shape)}
        check_state({k: tensors[k] for k in mine}, mine, f"{len(self.bias)}-class linear")
        with torch.no_grad():
            self.weight.copy_(tensors["weight"])
            self.bias.copy_(tensors["bias"])


def learner_from_metadata(method: str, metadata: dict[str, Any], loaded: Any) -> Any:
    """The :class:`PromptLearner` a prompt file's metadata describes (its class names and prompt
    settings), rebuilt on ``loaded``'s text tower."""
    if loaded is None:
        raise ValueError(f"{method} prompts need the CLIP model")
    from promptcli.models.prompt_learner import PromptConfig, PromptLearner

    config = PromptConfig.from_metadata(metadata.get("prompt_config", {}))
    return PromptLearner(loaded, list(metadata.get("classnames", [])), config)


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

    needs_model = True  # the text tower turns the learned prompt into class weights

    def file_metadata(self) -> dict[str, Any]:
        """The prompt's construction, so that :meth:`from_tensors` rebuilds the same learner."""
        config = self.learner.config
        return {
            "prompt_config": self.learner.used_config().to_metadata(),
            "n_ctx": int(getattr(self.learner, "n_ctx", config.n_ctx)),
            "class_position": config.class_position,
            "csc": config.csc,
            "ctx_init": config.ctx_init or "",
            "template": config.template,
            "logit_scale": self.logit_scale,
        }

    @classmethod
    def from_tensors(
        cls, method: str, tensors: dict[str, torch.Tensor], metadata: dict[str, Any], loaded: Any
    ) -> PromptHead:
        head = cls(learner_from_metadata(method, metadata, loaded), model_logit_scale(loaded), method)
        head.load_learnable_state(tensors)
        return head
