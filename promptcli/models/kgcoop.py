"""KgCoOp (Yao et al., CVPR 2023): CoOp whose learned class text features stay near the zero-shot ones.

The loss is CoOp's plus ``lambda * (1/C) sum_c ||t_c - t_c^zs||^2``, with ``t_c`` the learned and
``t_c^zs`` the zero-shot (template, ``--template``) class text features, both L2-normalised
(the paper's equation; its code writes the same term as ``1 - mean cos``, half of it for unit vectors).
The head is a :class:`~promptcli.models.heads.PromptHead` (same logits, same file) plus
:meth:`KgCoOpHead.regularizer`, which the training loop adds to each batch's loss.
"""

from __future__ import annotations

from typing import Any

import torch

from promptcli.models.head_base import PromptHead, apply_classifier
from promptcli.models.head_parts import metadata_float, zero_shot_text
from promptcli.models.zeroshot import DEFAULT_TEMPLATE
from promptcli.models.zeroshot import logit_scale as model_logit_scale

DEFAULT_LAMBDA = 8.0


class KgCoOpHead(PromptHead):
    """CoOp's head with the knowledge-guided regulariser."""

    def __init__(
        self,
        learner: Any,
        logit_scale: float,
        method: str,
        zero_shot: torch.Tensor,
        kg_lambda: float,
        template: str,
    ) -> None:
        super().__init__(learner, logit_scale, method)
        self.register_buffer("zero_shot", zero_shot.float().to(learner.device), persistent=False)
        self.kg_lambda = float(kg_lambda)
        self.kg_template = template
        self._step_weight: torch.Tensor | None = None

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        weight, bias, scale = self.classifier()
        if torch.is_grad_enabled():  # kept for regularizer(): the step's text pass is not repeated
            self._step_weight = weight
        return apply_classifier(features, weight, bias, scale)

    def regularizer(self) -> torch.Tensor:
        """``kg_lambda x`` mean over classes of ||t_c - t_c^zs||^2 (the class features of the last
        forward with gradient, used once; else a fresh text pass)."""
        weight = self._step_weight if self._step_weight is not None else self.learner()
        self._step_weight = None
        diff = weight.float() - self.zero_shot.to(weight.device)
        return self.kg_lambda * diff.pow(2).sum(dim=-1).mean()

    def file_metadata(self) -> dict[str, Any]:
        return {**super().file_metadata(), "kg_lambda": self.kg_lambda, "kg_template": self.kg_template}

    @classmethod
    def build(
        cls,
        method: str,
        *,
        classnames: list[str],
        loaded: Any,
        prompt_config: Any,
        generator: Any,
        options: Any,
        **_: Any,
    ) -> KgCoOpHead:
        from promptcli.models.prompt_learner import PromptLearner

        template = getattr(options, "template", None) or DEFAULT_TEMPLATE
        kg_lambda = getattr(options, "kg_lambda", DEFAULT_LAMBDA)
        learner = PromptLearner(loaded, classnames, prompt_config, generator=generator)
        zs = zero_shot_text(loaded, classnames, template)
        return cls(learner, model_logit_scale(loaded), method, zs, kg_lambda, template)

    @classmethod
    def from_tensors(
        cls, method: str, tensors: dict[str, torch.Tensor], metadata: dict[str, Any], loaded: Any
    ) -> KgCoOpHead:
        from promptcli.models.head_base import learner_from_metadata

        learner = learner_from_metadata(method, metadata, loaded)
        classnames = list(metadata.get("classnames", []))
        template = str(metadata.get("kg_template") or DEFAULT_TEMPLATE)
        zs = zero_shot_text(loaded, classnames, template)
        head = cls(
            learner, model_logit_scale(loaded), method, zs, metadata_float(metadata, "kg_lambda"), template
        )
        head.load_learnable_state(tensors)
        return head
