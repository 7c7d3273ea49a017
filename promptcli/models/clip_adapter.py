"""CLIP-Adapter (Gao et al., 2021): a residual bottleneck MLP on the image features, then the zero-shot classifier.

``A(x) = ReLU(W2 ReLU(W1 x))`` with W1 (D/4, D), W2 (D, D/4) and no biases (the paper's adapter);
``x' = ratio x A(x) + (1 - ratio) x x``, normalised; logits ``= logit_scale x x' @ T.T`` with ``T`` the
zero-shot class text features of ``--template`` (fixed). ``ratio`` 0 gives the zero-shot classifier.
The file holds the adapter and ``T``, so evaluation needs no model.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from promptcli.errors import InputError
from promptcli.models.head_parts import check_state, metadata_float, seeded_linear, zero_shot_text
from promptcli.models.zeroshot import DEFAULT_TEMPLATE
from promptcli.models.zeroshot import logit_scale as model_logit_scale

DEFAULT_RATIO = 0.2
REDUCTION = 4


def check_ratio(ratio: float) -> float:
    if not (math.isfinite(ratio) and 0.0 <= ratio <= 1.0):
        raise InputError(
            f"must be in [0, 1] (got {ratio})", where="--adapter-ratio", hint="the paper uses 0.2"
        )
    return float(ratio)


class ClipAdapterHead(nn.Module):
    """Residual MLP adapter on image features + fixed zero-shot text classifier."""

    needs_model = False  # the zero-shot text features are saved with the adapter
    predict_batch = 8192

    def __init__(
        self,
        text: torch.Tensor,
        logit_scale: float,
        ratio: float = DEFAULT_RATIO,
        method: str = "clip-adapter",
        template: str = DEFAULT_TEMPLATE,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        dim = int(text.shape[1])
        hidden = max(1, dim // REDUCTION)
        self.method = method
        self.ratio = check_ratio(ratio)
        self.logit_scale = float(logit_scale)
        self.template = template
        self.register_buffer("text", text.detach().float().clone())
        self.adapter = nn.Sequential(
            seeded_linear(dim, hidden, False, generator),
            nn.ReLU(),
            seeded_linear(hidden, dim, False, generator),
            nn.ReLU(),
        )

    @property
    def n_classes(self) -> int:
        return int(self.text.shape[0])

    def adapted(self, features: torch.Tensor) -> torch.Tensor:
        """The normalised adapted image features x'."""
        mixed = self.ratio * self.adapter(features) + (1.0 - self.ratio) * features
        return F.normalize(mixed, dim=-1)

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        x = self.adapted(features)
        return self.logit_scale * x @ self.text.t().to(x.dtype)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.logits(features)

    def param_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        return [{"params": list(self.adapter.parameters()), "weight_decay": weight_decay}]

    def learnable_state(self) -> dict[str, torch.Tensor]:
        """The adapter's weights and the (fixed) zero-shot text features: all the file needs."""
        return {
            "adapter.0.weight": self.adapter[0].weight.detach().clone(),
            "adapter.2.weight": self.adapter[2].weight.detach().clone(),
            "zero_shot_text": self.text.detach().clone(),
        }

    def load_learnable_state(self, tensors: dict[str, torch.Tensor]) -> None:
        check_state(tensors, {k: tuple(v.shape) for k, v in self.learnable_state().items()}, "clip-adapter")
        with torch.no_grad():
            self.adapter[0].weight.copy_(tensors["adapter.0.weight"])
            self.adapter[2].weight.copy_(tensors["adapter.2.weight"])
            self.text.copy_(tensors["zero_shot_text"])

    def file_metadata(self) -> dict[str, Any]:
        return {"adapter_ratio": self.ratio, "logit_scale": self.logit_scale, "template": self.template}

    @classmethod
    def build(
        cls, method: str, *, classnames: list[str], loaded: Any, generator: Any, options: Any, **_: Any
    ) -> ClipAdapterHead:
        template = getattr(options, "template", None) or DEFAULT_TEMPLATE
        text = zero_shot_text(loaded, classnames, template)
        ratio = getattr(options, "adapter_ratio", DEFAULT_RATIO)
        return cls(text, model_logit_scale(loaded), ratio, method, template, generator)

    @classmethod
    def from_tensors(
        cls, method: str, tensors: dict[str, torch.Tensor], metadata: dict[str, Any], loaded: Any
    ) -> ClipAdapterHead:
        text = tensors.get("zero_shot_text")
        if text is None or text.ndim != 2:
            raise InputError(
                "tensor 'zero_shot_text' missing or not 2-D", hint="is this a clip-adapter prompt?"
            )
        head = cls(
            text,
            metadata_float(metadata, "logit_scale"),
            metadata_float(metadata, "adapter_ratio"),
            method,
            str(metadata.get("template") or DEFAULT_TEMPLATE),
        )
        head.load_learnable_state(tensors)
        return head
