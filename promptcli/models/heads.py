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

from promptcli.choices import PROMPT_METHODS, Method
from promptcli.errors import InputError
from promptcli.models.loading import LoadedModel
from promptcli.models.zeroshot import logit_scale as model_logit_scale

TEXT_METHODS = PROMPT_METHODS  # learn text prompts through the frozen text tower


def check_method(method: str) -> str:
    return Method.check(method, "--method")


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
        head = cls(weight.shape[1], weight.shape[0], method)
        head.load_learnable_state(tensors)
        return head

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

    needs_model = True  # the text tower turns the learned prompt into class weights

    def file_metadata(self) -> dict[str, Any]:
        """The prompt's construction, so that :meth:`from_tensors` rebuilds the same learner."""
        config = self.learner.config
        return {
            "prompt_config": config.to_metadata(),
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
        if loaded is None:
            raise ValueError(f"{method} prompts need the CLIP model")
        from promptcli.models.prompt_learner import PromptConfig, PromptLearner

        config = PromptConfig.from_metadata(metadata.get("prompt_config", {}))
        learner = PromptLearner(loaded, list(metadata.get("classnames", [])), config)
        head = cls(learner, model_logit_scale(loaded), method)
        head.load_learnable_state(tensors)
        return head


Head = LinearHead | PromptHead

# The head class of each method: how it is saved and rebuilt. A test checks it covers every Method.
HEAD_OF_METHOD: dict[str, type[LinearHead] | type[PromptHead]] = {
    **{m: PromptHead for m in PROMPT_METHODS},
    Method.LINEAR_PROBE.value: LinearHead,
    Method.CLASSIFIER_ZS.value: LinearHead,
    Method.FINETUNE.value: LinearHead,  # the head; its image-tower tensors are an adapter (models/image_adapter)
}


def head_class(method: str, where: Any = "--method") -> type[LinearHead] | type[PromptHead]:
    """The head class of ``method`` (one-line error for an unknown method)."""
    if method not in HEAD_OF_METHOD:
        raise InputError(
            f"unknown method {method!r}", where=where, hint="use one of: " + ", ".join(HEAD_OF_METHOD)
        )
    return HEAD_OF_METHOD[method]


def method_needs_model(method: str, where: Any = "--method") -> bool:
    """Whether rebuilding a head of ``method`` from its file needs the CLIP model (the text tower)."""
    return head_class(method, where).needs_model


def save_head(path: Any, head: Head, metadata: dict[str, Any]) -> Any:
    """Write ``head``'s learned tensors and ``metadata`` (plus the head's own) to a prompt file."""
    from promptcli.io.prompt_files import save_prompt

    return save_prompt(path, head.learnable_state(), {**metadata, **head.file_metadata()})


def load_head(prompt: Any, loaded: LoadedModel | None) -> Head:
    """Rebuild the trained head of a prompt file (a :class:`~promptcli.io.prompt_files.PromptFile`)."""
    cls = head_class(prompt.method, where=prompt.path)
    try:
        return cls.from_tensors(prompt.method, prompt.tensors, prompt.metadata, loaded)
    except InputError as exc:
        raise InputError(exc.what, where=prompt.path, hint=exc.hint) from exc


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
        head = LinearHead(dim, len(classnames), method, weight=scale * text)
        head.template = template
        return head
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
