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
- ``kgcoop`` (models/kgcoop.py): a PromptHead whose ``regularizer()`` the training loop adds to the loss.

Heads whose logits are not of that form (``cocoop``: per-image class weights; ``clip-adapter``: an
MLP on the features; ``tip-adapter``: a cache model) have no ``classifier()`` and define
``logits(features)`` instead (and ``predict_batch``, the images per no-grad call): training,
evaluation, ``clean`` and the OT split go through :func:`predict_logits` / ``head(x)``, which use it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from promptcli.choices import PROMPT_METHODS, Method
from promptcli.errors import InputError
from promptcli.models.clip_adapter import ClipAdapterHead
from promptcli.models.cocoop import CoCoOpHead
from promptcli.models.head_base import LinearHead, PromptHead, apply_classifier  # noqa: F401  (the API)
from promptcli.models.kgcoop import KgCoOpHead
from promptcli.models.loading import LoadedModel
from promptcli.models.tip_adapter import TipAdapterHead
from promptcli.models.zeroshot import logit_scale as model_logit_scale

TEXT_METHODS = PROMPT_METHODS  # learn text prompts through the frozen text tower


def check_method(method: str) -> str:
    return Method.check(method, "--method")


Head = LinearHead | PromptHead | KgCoOpHead | CoCoOpHead | ClipAdapterHead | TipAdapterHead

# The head class of each method: how it is saved and rebuilt. A test checks it covers every Method.
HEAD_OF_METHOD: dict[str, type[Any]] = {
    **{m: PromptHead for m in PROMPT_METHODS},
    Method.LINEAR_PROBE.value: LinearHead,
    Method.CLASSIFIER_ZS.value: LinearHead,
    Method.FINETUNE.value: LinearHead,  # the head; its image-tower tensors are an adapter (models/image_adapter)
    Method.KGCOOP.value: KgCoOpHead,
    Method.COCOOP.value: CoCoOpHead,
    Method.CLIP_ADAPTER.value: ClipAdapterHead,
    Method.TIP_ADAPTER.value: TipAdapterHead,
    Method.TIP_ADAPTER_F.value: TipAdapterHead,
    # vpt: the frozen zero-shot classifier; maple: its final class text classifier, saved as a linear
    # head (weight = logit_scale x text features). Their vision prompts are an adapter (image_prompts).
    Method.VPT.value: LinearHead,
    Method.MAPLE.value: LinearHead,
}


def head_class(method: str, where: Any = "--method") -> type[Any]:
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
    options: Any = None,
    data: Any = None,
) -> Head:
    """A freshly initialised head for ``method`` (prompt methods and classifier-zs need the model).

    Heads with a ``build`` classmethod (the CoOp variants and the adapters) get the tune
    ``options`` and the training ``data`` too (tip-adapter's cache is made of it).
    """
    check_method(method)
    cls = HEAD_OF_METHOD[method]
    if hasattr(cls, "build"):
        return cls.build(
            method,
            classnames=list(classnames),
            dim=dim,
            loaded=loaded,
            prompt_config=prompt_config,
            generator=generator,
            options=options,
            data=data,
        )
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
    """(N, C) float32 logits, the class weights computed once for all images (when the head has them)."""
    return logits_predictor(head, batch)(features)


def predict_step(head: Head, batch: int = 8192) -> int:
    """The rows :func:`predict_logits` gives the head per call (its chunks start at multiples of it)."""
    return int(getattr(head, "predict_batch", batch)) if hasattr(head, "logits") else batch


@torch.no_grad()
def logits_predictor(head: Head, batch: int = 8192) -> Callable[[torch.Tensor], torch.Tensor]:
    """:func:`predict_logits` as a function of the features, the class weights computed once: given successive
    blocks of rows, each a multiple of :func:`predict_step` rows but the last, it computes what one call on
    all the rows would, chunk for chunk."""
    step = predict_step(head, batch)
    if hasattr(head, "logits"):  # no fixed class weights: the head's own logits, a chunk at a time

        @torch.no_grad()
        def own(features: torch.Tensor) -> torch.Tensor:
            parts = [
                head.logits(features[i : i + step].float()).float() for i in range(0, len(features), step)
            ]
            return torch.cat(parts) if parts else torch.zeros(0, len(head.classnames), device=features.device)

        return own
    weight, bias, scale = head.classifier()  # the text pass may run in mixed precision
    weight = weight.float()
    bias = None if bias is None else bias.float()

    @torch.no_grad()
    def fixed(features: torch.Tensor) -> torch.Tensor:
        # the logits themselves in fp32: in bf16 a logit of ~30 moves in steps of 0.125, enough to swap argmaxes
        with torch.autocast(features.device.type, enabled=False):
            out = [
                apply_classifier(features[i : i + step].float(), weight, bias, scale)
                for i in range(0, len(features), step)
            ]
        return torch.cat(out) if out else torch.zeros(0, weight.shape[0], device=features.device)

    return fixed
