"""Tip-Adapter and Tip-Adapter-F (Zhang et al., ECCV 2022): a cache model of the training features.

The cache keys K (N, D) are the training images' features (the normalised mean of their augmented
views when the file has views and they are used), the values V (N, C) the one-hot given (possibly
noisy) labels. For image features x:

    logits = logit_scale x x @ T.T + alpha x exp(-beta (1 - x @ K.T)) @ V

with T the zero-shot class text features of ``--template``. ``tip-adapter`` is training-free;
``tip-adapter-f`` learns K (initialised to the features). V is stored as the labels and applied by
``index_add`` (never an (N, C) matrix). With a validation split, :meth:`TipAdapterHead.search`
runs the paper's grid over (alpha, beta) on it. alpha 0 (or an empty cache) gives the zero-shot
classifier.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from promptcli.errors import InputError
from promptcli.models.head_parts import check_state, metadata_float, zero_shot_text
from promptcli.models.zeroshot import DEFAULT_TEMPLATE
from promptcli.models.zeroshot import logit_scale as model_logit_scale

# The paper's search (its ImageNet configuration): beta over 200 steps in [0.1, 7), alpha over 20 in [0.1, 3).
SEARCH_SCALE = (7.0, 3.0)
SEARCH_STEPS = (200, 20)


def check_tip_value(value: float, option: str) -> float:
    if not (math.isfinite(value) and value >= 0):
        raise InputError(
            f"must be a finite number >= 0 (got {value})", where=option, hint="the paper uses 1.0"
        )
    return float(value)


def search_grid() -> tuple[list[float], list[float]]:
    """The (beta, alpha) values the paper tries."""
    betas = [i * (SEARCH_SCALE[0] - 0.1) / SEARCH_STEPS[0] + 0.1 for i in range(SEARCH_STEPS[0])]
    alphas = [i * (SEARCH_SCALE[1] - 0.1) / SEARCH_STEPS[1] + 0.1 for i in range(SEARCH_STEPS[1])]
    return betas, alphas


class TipAdapterHead(nn.Module):
    """Zero-shot classifier + cache model; keys learnable for ``tip-adapter-f``."""

    needs_model = False  # the zero-shot text features and the cache are saved in the file
    predict_batch = 1024  # an (images x cache) affinity matrix per call

    def __init__(
        self,
        text: torch.Tensor,
        logit_scale: float,
        keys: torch.Tensor,
        cache_labels: torch.Tensor,
        alpha: float = 1.0,
        beta: float = 1.0,
        method: str = "tip-adapter",
        template: str = DEFAULT_TEMPLATE,
    ) -> None:
        super().__init__()
        n_classes = int(text.shape[0])
        if keys.ndim != 2 or keys.shape[1] != text.shape[1] or cache_labels.shape != (keys.shape[0],):
            raise InputError(
                f"cache keys {list(keys.shape)} / labels {list(cache_labels.shape)} do not fit text {list(text.shape)}",
                where="prompt state",
                hint="is this a tip-adapter prompt?",
            )
        labels = cache_labels.long()
        if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= n_classes):
            raise InputError(
                f"cache labels outside 0..{n_classes - 1}",
                where="prompt state",
                hint="the prompt file is damaged",
            )
        self.method = method
        self.learn_keys = method == "tip-adapter-f"
        self.alpha = check_tip_value(alpha, "--tip-alpha")
        self.beta = check_tip_value(beta, "--tip-beta")
        self.logit_scale = float(logit_scale)
        self.template = template
        self.search_result: dict[str, Any] | None = None
        self.register_buffer("text", text.detach().float().clone())
        self.register_buffer("cache_labels", labels.clone())
        if self.learn_keys:
            self.keys = nn.Parameter(keys.detach().float().clone())
        else:
            self.register_buffer("keys", keys.detach().float().clone())

    @property
    def n_classes(self) -> int:
        return int(self.text.shape[0])

    def zero_shot_logits(self, features: torch.Tensor) -> torch.Tensor:
        return self.logit_scale * features @ self.text.t().to(features.dtype)

    def cache_logits(self, features: torch.Tensor, beta: float | None = None) -> torch.Tensor:
        """exp(-beta (1 - x K^T)) V as (B, C): each cache entry's weight added to its label's column."""
        beta = self.beta if beta is None else beta
        affinity = features @ self.keys.t().to(features.dtype)
        weights = torch.exp(-beta * (1.0 - affinity))
        out = torch.zeros(features.shape[0], self.n_classes, dtype=weights.dtype, device=weights.device)
        return out.index_add(1, self.cache_labels, weights)

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        zs = self.zero_shot_logits(features)
        if self.alpha == 0.0:
            return zs
        return zs + self.alpha * self.cache_logits(features).to(zs.dtype)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.logits(features)

    def param_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        return [{"params": [self.keys] if self.learn_keys else [], "weight_decay": weight_decay}]

    @torch.no_grad()
    def search(self, features: torch.Tensor, labels: torch.Tensor) -> dict[str, Any]:
        """Set (alpha, beta) to the paper's grid point with the best accuracy on (features, labels).

        Beta outer, alpha inner, strictly better replaces (the paper's order); returns a summary.
        """
        betas, alphas = search_grid()
        features = features.float().to(self.text.device)
        labels = labels.to(self.text.device)
        zs = self.zero_shot_logits(features)
        best = (-1.0, self.alpha, self.beta)
        for beta in betas:
            cache = self.cache_logits(features, beta)
            for alpha in alphas:
                acc = float(((zs + alpha * cache).argmax(1) == labels).float().mean())
                if acc > best[0]:
                    best = (acc, alpha, beta)
        before = float((self.logits(features).argmax(1) == labels).float().mean())
        self.alpha, self.beta = best[1], best[2]
        self.search_result = {
            "n_val": int(len(labels)),
            "val_accuracy_before": before,
            "val_accuracy": best[0],
            "alpha": self.alpha,
            "beta": self.beta,
            "grid": {
                "beta": [betas[0], betas[-1], len(betas)],
                "alpha": [alphas[0], alphas[-1], len(alphas)],
            },
            "labels": "the given labels of the held-out rows",
        }
        return self.search_result

    def learnable_state(self) -> dict[str, torch.Tensor]:
        """The cache (keys, labels) and the zero-shot text features: all the file needs."""
        return {
            "keys": self.keys.detach().clone(),
            "cache_labels": self.cache_labels.detach().clone(),
            "zero_shot_text": self.text.detach().clone(),
        }

    def load_learnable_state(self, tensors: dict[str, torch.Tensor]) -> None:
        check_state(tensors, {k: tuple(v.shape) for k, v in self.learnable_state().items()}, self.method)
        if tensors["cache_labels"].is_floating_point():
            raise InputError(
                "cache labels are not integers", where="prompt state", hint="the file is damaged"
            )
        with torch.no_grad():
            self.keys.copy_(tensors["keys"])
            self.cache_labels.copy_(tensors["cache_labels"])
            self.text.copy_(tensors["zero_shot_text"])

    def file_metadata(self) -> dict[str, Any]:
        meta: dict[str, Any] = {
            "tip_alpha": self.alpha,
            "tip_beta": self.beta,
            "logit_scale": self.logit_scale,
            "template": self.template,
            "cache_size": int(self.keys.shape[0]),
        }
        if self.search_result is not None:
            meta["tip_search"] = self.search_result
        return meta

    @classmethod
    def build(
        cls, method: str, *, classnames: list[str], loaded: Any, options: Any, data: Any, **_: Any
    ) -> TipAdapterHead:
        if data is None:
            raise ValueError(f"{method} needs the training data for its cache")
        template = getattr(options, "template", None) or DEFAULT_TEMPLATE
        text = zero_shot_text(loaded, classnames, template)
        keys = data.features.float()
        if data.views is not None and getattr(options, "use_views", True):
            keys = F.normalize(data.views.float().mean(dim=1), dim=-1)  # the paper's augmented cache
        return cls(
            text,
            model_logit_scale(loaded),
            keys.cpu(),
            data.labels.cpu(),
            getattr(options, "tip_alpha", 1.0),
            getattr(options, "tip_beta", 1.0),
            method,
            template,
        )

    @classmethod
    def from_tensors(
        cls, method: str, tensors: dict[str, torch.Tensor], metadata: dict[str, Any], loaded: Any
    ) -> TipAdapterHead:
        missing = {"keys", "cache_labels", "zero_shot_text"} - set(tensors)
        if missing:
            raise InputError(
                f"tensor(s) {', '.join(sorted(missing))} missing", hint="is this a tip-adapter prompt?"
            )
        if tensors["cache_labels"].is_floating_point():
            raise InputError(
                "cache labels are not integers", where="prompt state", hint="the file is damaged"
            )
        head = cls(
            tensors["zero_shot_text"],
            metadata_float(metadata, "logit_scale"),
            tensors["keys"],
            tensors["cache_labels"],
            metadata_float(metadata, "tip_alpha"),
            metadata_float(metadata, "tip_beta"),
            method,
            str(metadata.get("template") or DEFAULT_TEMPLATE),
        )
        search = metadata.get("tip_search")
        head.search_result = search if isinstance(search, dict) else None
        return head
