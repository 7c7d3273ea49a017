"""CoCoOp (Zhou et al., CVPR 2022): CoOp's context shifted per image by a small meta-net.

For image features x, the meta-net ``h(x) = W2 ReLU(W1 x + b1) + b2`` (D -> D/16 -> context width)
gives a shift pi = h(x); the prompt of class c for that image is ``[SOS] v_1+pi .. v_M+pi [name_c] . [EOS]``
(the paper's ``t_c(x) = {v_1(x), ..., v_M(x), c_c}``, ``v_m(x) = v_m + pi``), and the logit is
``logit_scale x x . g(t_c(x))`` with g the text tower (normalised). The context starts from
``--ctx-init`` (default "a photo of a", the paper's 4 tokens); class-specific context and other class
positions are not part of the method.

Cost: the text pass is per image and class. Under the causal mask the tokens before the class name
(start token and shifted context, P = M + 1) do not depend on the class, so each image's prefix goes
through every block once, and each (image, class) row adds only its own few tokens (name, ``.``, end),
packed without padding (:meth:`~promptcli.models.prompt_learner._NativeTower.encode_packed`), instead
of B x C full 77-token sequences (:meth:`CoCoOpHead.text_features_plain`, the reference).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from promptcli.errors import InputError
from promptcli.models.head_parts import check_state, seeded_linear
from promptcli.models.text_packing import encode_grouped, group_by_length
from promptcli.models.zeroshot import logit_scale as model_logit_scale

DEFAULT_CTX_INIT = "a photo of a"
META_REDUCTION = 16
_META = "meta_net."


class CoCoOpHead(nn.Module):
    """Logits from image-conditioned prompts: a CoOp learner plus a meta-net."""

    needs_model = True  # the text tower turns the (shifted) prompts into class weights
    predict_batch = 64  # images per no-grad text pass (each costs images x classes short rows)

    def __init__(
        self,
        learner: Any,
        logit_scale: float,
        dim: int,
        method: str = "cocoop",
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        config = learner.config
        if config.csc or config.class_position != "end":
            raise InputError(
                "cocoop shifts one shared context placed before the class name",
                where="--csc" if config.csc else "--class-position",
                hint="drop --csc and --class-position",
            )
        self.learner = learner
        self.logit_scale = float(logit_scale)
        self.method = method
        width = int(learner.ctx.shape[-1])
        hidden = max(1, dim // META_REDUCTION)
        self.meta_net = nn.Sequential(
            OrderedDict(
                linear1=seeded_linear(dim, hidden, True, generator),
                relu=nn.ReLU(),
                linear2=seeded_linear(hidden, width, True, generator),
            )
        ).to(learner.device)
        # Where the context tokens sit in each class prompt: the positions the shift is added to.
        # (the learner's learnable positions; for coop without csc they are exactly the context)
        mask = torch.zeros(len(learner.classnames), learner.full_length, device=learner.device)
        mask[learner._rows_c, learner._rows_p] = 1.0
        self.register_buffer("ctx_mask", mask, persistent=False)
        self.shared = learner.fast_path == "shared-prefix"
        if self.shared:
            p = learner.shared_prefix_len
            same = bool((mask[:, :p] == mask[:1, :p]).all()) and not bool(mask[:, p:].any())
            if not same:
                raise RuntimeError("cocoop: the context is not inside the shared prefix")
        self._groups: dict[tuple[int, str], Any] = {}

    @property
    def classnames(self) -> list[str]:
        return self.learner.classnames

    @property
    def n_classes(self) -> int:
        return len(self.learner.classnames)

    def shift(self, features: torch.Tensor) -> torch.Tensor:
        """(B, W) the meta-net's shift of the context for each image."""
        return self.meta_net(features.float())

    def _row_groups(self, n_images: int, device: torch.device) -> Any:
        key = (n_images, str(device))
        if key not in self._groups:
            self._groups = {key: group_by_length(list(self.learner.needed_tokens) * n_images, device)}
        return self._groups[key]

    def text_features(self, shift: torch.Tensor) -> torch.Tensor:
        """(B, C, D) normalised class text features of each image's prompts (shift (B, W))."""
        learner = self.learner
        tower = learner._tower  # the learner's frozen text tower (not registered on purpose)
        n_img, n_cls = shift.shape[0], self.n_classes
        emb = learner.prompt_embeddings()  # (C, seq_len, W); gradient flows into the context
        mask = self.ctx_mask[:, : emb.shape[1], None].to(emb.dtype)
        shift = shift.to(emb.dtype)
        groups = self._row_groups(n_img, emb.device)
        if self.shared:
            p = learner.shared_prefix_len
            prefix = emb[:1, :p] + mask[:1, :p] * shift[:, None, :]  # (B, P, W): one per image
            suffix = emb[:, p:].repeat(n_img, 1, 1)  # row b*C + c: class c's own tokens
            owner = torch.arange(n_img, device=emb.device).repeat_interleave(n_cls)
            feats = tower.encode_packed(prefix, suffix, groups, owner)
        else:
            x = (emb[None] + mask[None] * shift[:, None, None, :]).flatten(0, 1)
            ids = learner.token_ids[:, : emb.shape[1]].repeat(n_img, 1)
            pool = learner.pool_index.repeat(n_img)
            if learner.fast_path == "full":
                feats = tower.encode(x, ids, pool)
            else:
                feats = encode_grouped(tower.encode, x, ids, pool, groups)
        return F.normalize(feats.float(), dim=-1).view(n_img, n_cls, -1)

    def text_features_plain(self, shift: torch.Tensor) -> torch.Tensor:
        """The same features the straightforward way: B x C full-length prompts through the tower."""
        learner = self.learner
        emb = learner.prompt_embeddings(learner.full_length)
        x = emb[None] + self.ctx_mask[None, :, :, None].to(emb.dtype) * shift[:, None, None, :].to(emb.dtype)
        n_img = shift.shape[0]
        feats = learner._tower.encode(
            x.flatten(0, 1), learner.token_ids.repeat(n_img, 1), learner.pool_index.repeat(n_img)
        )
        return F.normalize(feats.float(), dim=-1).view(n_img, self.n_classes, -1)

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        text = self.text_features(self.shift(features))
        return self.logit_scale * torch.einsum("bd,bcd->bc", features.float(), text)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.logits(features)

    def param_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        params = [p for p in self.learner.parameters() if p.requires_grad] + list(self.meta_net.parameters())
        return [{"params": params, "weight_decay": weight_decay}]

    def learnable_state(self) -> dict[str, torch.Tensor]:
        state = {k: v.detach().clone() for k, v in self.learner.learnable_state().items()}
        state.update(
            {_META + k: v.detach().float().cpu().clone() for k, v in self.meta_net.state_dict().items()}
        )
        return state

    def load_learnable_state(self, tensors: dict[str, torch.Tensor]) -> None:
        meta = {k[len(_META) :]: v for k, v in tensors.items() if k.startswith(_META)}
        check_state(
            meta, {k: tuple(v.shape) for k, v in self.meta_net.state_dict().items()}, "cocoop meta-net"
        )
        self.learner.load_learnable_state({k: v for k, v in tensors.items() if not k.startswith(_META)})
        with torch.no_grad():
            for name, value in self.meta_net.state_dict().items():
                value.copy_(meta[name])

    def file_metadata(self) -> dict[str, Any]:
        config = self.learner.config
        return {
            "prompt_config": self.learner.used_config().to_metadata(),
            "n_ctx": int(self.learner.n_ctx),
            "ctx_init": config.ctx_init or "",
            "logit_scale": self.logit_scale,
            "meta_net": f"{self.meta_net.linear1.in_features} -> {self.meta_net.linear1.out_features} -> ReLU -> "
            f"{self.meta_net.linear2.out_features}",
        }

    @classmethod
    def build(
        cls,
        method: str,
        *,
        classnames: list[str],
        dim: int,
        loaded: Any,
        prompt_config: Any,
        generator: Any,
        **_: Any,
    ) -> CoCoOpHead:
        from promptcli.models.prompt_learner import PromptLearner

        learner = PromptLearner(loaded, classnames, prompt_config, generator=generator)
        return cls(learner, model_logit_scale(loaded), dim, method, generator)

    @classmethod
    def from_tensors(
        cls, method: str, tensors: dict[str, torch.Tensor], metadata: dict[str, Any], loaded: Any
    ) -> CoCoOpHead:
        if loaded is None:
            raise ValueError(f"{method} prompts need the CLIP model")
        from promptcli.models.head_base import learner_from_metadata

        weight = tensors.get(_META + "linear1.weight")
        if weight is None or weight.ndim != 2:
            raise InputError("tensor 'meta_net.linear1.weight' missing", hint="is this a cocoop prompt?")
        learner = learner_from_metadata(method, metadata, loaded)
        head = cls(learner, model_logit_scale(loaded), int(weight.shape[1]), method)
        head.load_learnable_state(tensors)
        return head
