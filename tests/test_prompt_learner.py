"""Prompt learner: exactness against zero-shot at initialisation, the fast path against the plain one,
frozen CLIP weights, state round trips; native open_clip text towers and a tiny Hugging Face BERT tower."""

from __future__ import annotations

import inspect
import json

import pytest
import torch

from promptcli.errors import InputError
from promptcli.models.loading import load_model
from promptcli.models.prompt_learner import PromptConfig, PromptLearner
from promptcli.models.zeroshot import class_text_embeddings

NAMES = ["red apple", "blue sky", "green grass", "t-shirt", "apples"]  # 2, 2, 2, 3 and 1 (CLIP BPE) tokens
VISION = {"image_size": 32, "layers": 1, "width": 64, "patch_size": 8, "head_width": 32}
TOL = dict(atol=2e-6, rtol=0)


def _native_model(name: str, **text_cfg):
    cfg = {
        "embed_dim": 32,
        "vision_cfg": VISION,
        "text_cfg": {
            "context_length": 77,
            "vocab_size": 49408,
            "width": 64,
            "heads": 2,
            "layers": 2,
            **text_cfg,
        },
    }
    if text_cfg:
        cfg["custom_text"] = True
    torch.manual_seed(1)
    return load_model(name, None, cfg, device="cpu", random_weights=True, seed=1)


@pytest.fixture(scope="module")
def tiny_hf_model(tmp_path_factory):
    """A CLIP whose text tower is a 2-layer BERT (width 32) with a 17-word WordPiece vocabulary, all local."""
    transformers = pytest.importorskip("transformers")
    folder = tmp_path_factory.mktemp("tiny-bert")
    words = ["a", "photo", "of", "red", "apple", "blue", "sky", "green", "grass", ".", "x", "t", "-", "shirt"]
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words, "##s", "the"]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    if "vocab" in inspect.signature(transformers.BertTokenizer.__init__).parameters:  # transformers >= 5
        tokenizer = transformers.BertTokenizer(vocab={w: i for i, w in enumerate(vocab)})
    else:
        tokenizer = transformers.BertTokenizer(vocab_file=str(folder / "vocab.txt"))
    tokenizer.save_pretrained(str(folder))
    torch.manual_seed(2)
    bert_cfg = transformers.BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    transformers.BertModel(bert_cfg, add_pooling_layer=False).save_pretrained(str(folder))
    text_cfg = {
        "hf_model_name": str(folder),
        "hf_tokenizer_name": str(folder),
        "hf_pooler_type": "mean_pooler",
        "hf_proj_type": "linear",
        "context_length": 32,
    }
    loaded = load_model(
        "tiny-hf-bert",
        None,
        {"embed_dim": 16, "vision_cfg": VISION, "text_cfg": text_cfg},
        random_weights=True,
    )
    ids = loaded.tokenizer(["a photo of a red apple."])[0].tolist()
    assert ids[:9] == [2, 5, 6, 7, 5, 8, 9, 14, 3]  # the vocabulary really is used (no [UNK])
    return loaded


@pytest.fixture(scope="module")
def custom_block_model():
    """CustomTextCLIP with open_clip's custom attention block (qk-norm, head scale, inner norm, layer scale)."""
    return _native_model(
        "tiny-custom-block",
        qk_norm=True,
        scale_heads=True,
        scale_attn_inner=True,
        scale_fc=True,
        ls_init_value=0.5,
    )


def _zero_shot(loaded, template="a photo of a {}.", names=NAMES):
    return class_text_embeddings(loaded, names, [template])


def _learner(loaded, names=NAMES, seed=0, **cfg) -> PromptLearner:
    return PromptLearner(loaded, names, PromptConfig(**cfg), generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- exactness at initialisation

INIT_CASES = [
    (dict(ctx_init="a photo of a"), "a photo of a {}."),
    (dict(ctx_init="a photo of a", class_position="front"), "{} a photo of a."),
    (dict(ctx_init="a photo of a", class_position="middle"), "a photo {} of a."),
    (dict(ctx_init="a photo of", class_position="middle"), "a {} photo of."),
    (dict(ctx_init="a photo of a", csc=True), "a photo of a {}."),
    (dict(method="cls-tuning"), "a photo of a {}."),
    (dict(method="full-prompt"), "a photo of a {}."),
    (dict(method="full-prompt", csc=True), "a photo of a {}."),
    (dict(method="cls-tuning", template="{}, of a photo"), "{}, of a photo"),
    (dict(method="full-prompt", template="a {}"), "a {}"),
]


@pytest.mark.parametrize(("cfg", "template"), INIT_CASES)
def test_initialised_learner_equals_zero_shot_native(tiny_model, cfg, template):
    learner = _learner(tiny_model, **cfg)
    expected = _zero_shot(tiny_model, template)
    torch.testing.assert_close(learner(), expected, **TOL)
    torch.testing.assert_close(learner.forward_plain(), expected, **TOL)


@pytest.mark.parametrize(("cfg", "template"), INIT_CASES[:3] + INIT_CASES[5:8])
def test_initialised_learner_equals_zero_shot_hf(tiny_hf_model, cfg, template):
    learner = _learner(tiny_hf_model, **cfg)
    expected = _zero_shot(tiny_hf_model, template)
    torch.testing.assert_close(learner(), expected, **TOL)
    torch.testing.assert_close(learner.forward_plain(), expected, **TOL)
    # [CLS] + 4 + 3 (t - shirt) + "." + [SEP]
    assert learner.fast_path == "truncated" and learner.seq_len == 10


def test_initialised_learner_equals_zero_shot_custom_block(custom_block_model):
    learner = _learner(custom_block_model, ctx_init="a photo of a")
    assert learner.fast_path == "shared-prefix"
    torch.testing.assert_close(learner(), _zero_shot(custom_block_model), **TOL)


@pytest.mark.parametrize(
    ("name", "text_cfg", "path"),
    [
        # bidirectional, pooled at the last position: nothing can be skipped
        ("tiny-bidir", dict(no_causal_mask=True, pool_type="last"), "full"),
        # CoCa-style appended class token with padding mask: its position depends on the full length
        ("tiny-cls-emb", dict(embed_cls=True, pad_id=0), "full"),
        # eos pooling with a linear projection with bias: truncation is exact
        ("tiny-eos", dict(pool_type="eos", eos_id=49407, proj_bias=True), "shared-prefix"),
    ],
)
def test_other_native_towers_fall_back_exactly(name, text_cfg, path):
    loaded = _native_model(name, **text_cfg)
    learner = _learner(loaded, ctx_init="a photo of a")
    assert learner.fast_path == path
    expected = _zero_shot(loaded)
    torch.testing.assert_close(learner(), expected, **TOL)
    torch.testing.assert_close(learner.forward_plain(), expected, **TOL)


# --------------------------------------------------------------------------- fast path == plain path


def _values_and_grads(learner: PromptLearner, fn, weights: torch.Tensor):
    learner.zero_grad()
    out = fn()
    (out * weights[: out.shape[0], : out.shape[1]]).sum().backward()
    return out.detach(), {n: p.grad.detach().clone() for n, p in learner.named_parameters()}


FAST_CASES = [
    (dict(), "shared-prefix", 17),  # default CoOp: [SOS] + 16 shared context vectors
    (dict(csc=True), "truncated", 0),
    (dict(class_position="middle"), "shared-prefix", 9),
    (dict(class_position="front"), "truncated", 0),
    (dict(method="cls-tuning"), "shared-prefix", 5),
    (dict(method="full-prompt"), "shared-prefix", 5),
    (dict(method="full-prompt", csc=True), "truncated", 0),
]


@pytest.mark.parametrize(("cfg", "path", "prefix"), FAST_CASES)
def test_fast_path_matches_plain_values_and_gradients(tiny_model, cfg, path, prefix):
    learner = _learner(tiny_model, seed=3, **cfg)
    assert (learner.fast_path, learner.shared_prefix_len) == (path, prefix)
    assert learner.seq_len < learner.full_length == 77
    weights = torch.randn(len(NAMES), 32, generator=torch.Generator().manual_seed(4))
    fast, fast_grads = _values_and_grads(learner, learner.forward, weights)
    plain, plain_grads = _values_and_grads(learner, learner.forward_plain, weights)
    torch.testing.assert_close(fast, plain, **TOL)
    assert fast_grads.keys() == plain_grads.keys()
    for name in plain_grads:
        scale = plain_grads[name].abs().max().item()
        assert scale > 0
        # float32 sums in another order: the CPU's kernels (AVX2 vs AVX-512) move single elements by ~1e-5
        torch.testing.assert_close(fast_grads[name], plain_grads[name], atol=1e-4 * scale, rtol=1e-3)


def test_fast_path_custom_block_matches_plain(custom_block_model):
    learner = _learner(custom_block_model, seed=5)
    assert learner.fast_path == "shared-prefix"
    weights = torch.randn(len(NAMES), 32, generator=torch.Generator().manual_seed(6))
    fast, fast_grads = _values_and_grads(learner, learner.forward, weights)
    plain, plain_grads = _values_and_grads(learner, learner.forward_plain, weights)
    torch.testing.assert_close(fast, plain, **TOL)
    torch.testing.assert_close(fast_grads["ctx"], plain_grads["ctx"], atol=1e-5, rtol=1e-4)


def test_hf_truncated_path_matches_plain_gradients(tiny_hf_model):
    learner = _learner(tiny_hf_model, seed=7, n_ctx=4)
    assert learner.fast_path == "truncated" and learner.seq_len == 10 < learner.full_length == 32
    weights = torch.randn(len(NAMES), 16, generator=torch.Generator().manual_seed(8))
    fast, fast_grads = _values_and_grads(learner, learner.forward, weights)
    plain, plain_grads = _values_and_grads(learner, learner.forward_plain, weights)
    torch.testing.assert_close(fast, plain, **TOL)
    torch.testing.assert_close(fast_grads["ctx"], plain_grads["ctx"], atol=1e-5, rtol=1e-4)


def test_default_coop_forward_takes_the_shared_prefix_path(tiny_model, monkeypatch):
    learner = _learner(tiny_model)
    calls = []
    original = learner._forward_shared_prefix
    monkeypatch.setattr(learner, "_forward_shared_prefix", lambda x: calls.append(x.shape) or original(x))
    learner()
    assert calls == [torch.Size([len(NAMES), learner.seq_len, 64])]
    learner.forward_plain()
    assert len(calls) == 1


# --------------------------------------------------------------------------- training behaviour


@pytest.mark.parametrize("cfg", [dict(), dict(method="cls-tuning"), dict(method="full-prompt", csc=True)])
def test_only_learnable_tensors_train_and_clip_stays_frozen(tiny_model, cfg):
    learner = _learner(tiny_model, **cfg)
    expected_names = {
        "coop": {"ctx"},
        "cls-tuning": {"class_tokens"},
        "full-prompt": {"ctx", "ctx_suffix", "class_tokens"},
    }
    assert {n for n, _ in learner.named_parameters()} == expected_names[learner.config.method]
    assert set(learner.state_dict()) == expected_names[learner.config.method]
    clip_before = {k: v.clone() for k, v in tiny_model.model.state_dict().items()}
    learnable_before = learner.learnable_state()
    image_features = torch.nn.functional.normalize(
        torch.randn(8, 32, generator=torch.Generator().manual_seed(9)), dim=-1
    )
    targets = torch.tensor([0, 1, 2, 3, 4, 0, 1, 2])
    optimizer = torch.optim.SGD(learner.parameters(), lr=1.0)
    learner.train()
    loss = torch.nn.functional.cross_entropy(100 * image_features @ learner().t(), targets)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().max() > 0 for p in learner.parameters())
    assert all(p.grad is None for p in tiny_model.model.parameters())
    optimizer.step()
    assert not tiny_model.model.training
    for key, value in tiny_model.model.state_dict().items():
        assert torch.equal(value, clip_before[key]), key
    after = learner.learnable_state()
    assert all(not torch.equal(after[n], learnable_before[n]) for n in after)


def test_learnable_state_round_trip_through_safetensors(tiny_model, tmp_path):
    from safetensors.torch import load_file, safe_open, save_file

    config = PromptConfig(method="full-prompt", csc=True, template="a {} photo.")
    learner = PromptLearner(tiny_model, NAMES, config)
    with torch.no_grad():
        for p in learner.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(10)) * 0.1)
    expected = learner()
    path = tmp_path / "prompt.safetensors"
    save_file(learner.learnable_state(), str(path), metadata={**config.to_metadata(), "other": "x"})
    with safe_open(str(path), framework="pt") as handle:
        restored_config = PromptConfig.from_metadata(handle.metadata())
    assert restored_config == config
    fresh = PromptLearner(tiny_model, NAMES, restored_config)
    assert not torch.allclose(fresh(), expected)
    fresh.load_learnable_state(load_file(str(path)))
    torch.testing.assert_close(fresh(), expected, atol=0, rtol=0)
    state = learner.learnable_state()
    assert {k: list(v.shape) for k, v in state.items()} == {
        "ctx": [5, 1, 64],  # "a" per class
        "ctx_suffix": [5, 2, 64],  # "photo ." per class
        "class_tokens": [10, 64],  # 2 + 2 + 2 + 3 + 1 name tokens
    }


def test_load_learnable_state_rejects_other_shapes(tiny_model):
    learner = _learner(tiny_model, n_ctx=4)
    other = _learner(tiny_model, n_ctx=8).learnable_state()
    with pytest.raises(InputError, match=r"ctx \[8, 64\] do not fit this prompt learner \(ctx \[4, 64\]\)"):
        learner.load_learnable_state(other)
    with pytest.raises(InputError, match="do not fit"):
        learner.load_learnable_state({"ctx": torch.zeros(4, 64), "extra": torch.zeros(1)})


def test_random_init_is_seeded(tiny_model):
    a = _learner(tiny_model, seed=11, n_ctx=16, init_std=0.02).learnable_state()["ctx"]
    b = _learner(tiny_model, seed=11, n_ctx=16, init_std=0.02).learnable_state()["ctx"]
    c = _learner(tiny_model, seed=12, n_ctx=16, init_std=0.02).learnable_state()["ctx"]
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == (16, 64) and 0.017 < a.std().item() < 0.023 and abs(a.mean().item()) < 0.003
    csc = _learner(tiny_model, seed=11, csc=True, n_ctx=3).learnable_state()["ctx"]
    assert csc.shape == (len(NAMES), 3, 64)


def test_ctx_init_sets_n_ctx_and_initial_vectors(tiny_model):
    learner = _learner(tiny_model, ctx_init="a photo of a", n_ctx=16)
    assert learner.n_ctx == 4
    ids = tiny_model.tokenizer(["a photo of a"])[0, 1:5]
    expected = tiny_model.model.token_embedding.weight[ids]
    torch.testing.assert_close(learner.learnable_state()["ctx"], expected, atol=0, rtol=0)


# --------------------------------------------------------------------------- configuration


def test_config_metadata_round_trip():
    config = PromptConfig(
        method="coop", n_ctx=8, ctx_init="a photo of", class_position="middle", csc=True, init_std=0.5
    )
    meta = config.to_metadata()
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items())
    assert PromptConfig.from_metadata({**meta, "model_name": "x"}) == config
    assert PromptConfig.from_metadata(PromptConfig().to_metadata()) == PromptConfig()
    assert json.loads(json.dumps(meta)) == meta
    with pytest.raises(InputError, match="bad value 'maybe' for prompt.csc"):
        PromptConfig.from_metadata({**meta, "prompt.csc": "maybe"})


@pytest.mark.parametrize(
    ("cfg", "message"),
    [
        (dict(method="vpt"), "unknown prompt method 'vpt'"),
        (dict(class_position="left"), "unknown class position 'left'"),
        (dict(n_ctx=0), "n_ctx must be at least 1"),
        (dict(ctx_init="  "), "empty context initialisation"),
        (dict(method="cls-tuning", template="a photo"), "must contain exactly one {}"),
        (dict(method="cls-tuning", template="{x} photo"), "must contain exactly one {}"),
        (dict(method="cls-tuning", csc=True), "csc needs learnable context"),
        (dict(method="full-prompt", ctx_init="a photo"), "ctx_init applies to coop only"),
        (dict(method="full-prompt", class_position="front"), "class_position applies to coop only"),
    ],
)
def test_bad_config_is_an_input_error(tiny_model, cfg, message):
    with pytest.raises(InputError, match=message.replace("{", r"\{").replace("}", r"\}")):
        _learner(tiny_model, **cfg)


def test_prompt_longer_than_context_is_an_input_error(tiny_model):
    with pytest.raises(InputError, match="needs 78 tokens but the model's text context holds 77") as info:
        _learner(tiny_model, names=["red apple"], n_ctx=73)
    assert info.value.where == "class 'red apple'"
    assert _learner(tiny_model, names=["red apple"], n_ctx=72).seq_len == 77


# --------------------------------------------------------------------------- length groups and class chunks

# 1 to 7 CLIP BPE tokens: several length groups on every path
VARIED = [
    "tench",
    "great white shark",
    "hammerhead shark",
    "cock",
    "American robin",
    "European green lizard",
    "loggerhead sea turtle",
    "eft",
    "Carolina anole",
    "smooth newt",
    "spotted salamander",
    "axolotl",
    "American bullfrog",
    "tree frog",
    "desert grassland whiptail lizard",
    "Komodo dragon",
    "Nile crocodile",
    "triceratops",
    "worm snake",
    "ring-necked snake",
    "Saharan horned viper",
    "kingsnake",
    "garter snake",
    "water snake",
]

GROUP_CASES = [
    dict(),
    dict(csc=True),
    dict(class_position="middle"),
    dict(class_position="front"),
    dict(method="cls-tuning"),
    dict(method="full-prompt"),
]


def _assert_same(a, b):
    (values_a, grads_a), (values_b, grads_b) = a, b
    torch.testing.assert_close(values_a, values_b, **TOL)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        assert grads_a[name].abs().max() > 0
        scale = float(grads_b[name].abs().max())
        # float32 sums in another order: an entry that is a small difference of large terms is off by
        # a few ulps of the large terms, so the absolute tolerance follows the gradient's scale
        torch.testing.assert_close(grads_a[name], grads_b[name], atol=max(1e-5, 2e-6 * scale), rtol=1e-4)


@pytest.mark.parametrize("cfg", GROUP_CASES)
def test_length_groups_match_plain_values_and_gradients(tiny_model, cfg):
    learner = _learner(tiny_model, names=VARIED, seed=12, **cfg)
    (chunk,) = learner.chunks(None)
    assert len(chunk.groups) >= 4  # classes really are computed to different lengths
    assert sorted(torch.cat([g.rows for g in chunk.groups]).tolist()) == list(range(len(VARIED)))
    weights = torch.randn(len(VARIED), 32, generator=torch.Generator().manual_seed(13))
    _assert_same(
        _values_and_grads(learner, learner.forward, weights),
        _values_and_grads(learner, learner.forward_plain, weights),
    )


def test_shared_prefix_path_computes_each_class_to_its_own_end_of_text(tiny_model):
    learner = _learner(tiny_model, names=VARIED)
    assert learner.fast_path == "shared-prefix" and learner.shared_prefix_len == 17
    own = [len(learner._scheme.encode(name)) + 2 for name in VARIED]  # name tokens + "." + [EOT]
    assert learner.needed_tokens == own
    assert learner.seq_len == 17 + max(own) and min(own) < max(own) - 4


@pytest.mark.parametrize(("cfg", "chunk"), [(cfg, 5) for cfg in GROUP_CASES] + [(dict(), 1)])
def test_class_chunks_match_one_pass(tiny_model, cfg, chunk):
    weights = torch.randn(len(VARIED), 32, generator=torch.Generator().manual_seed(14))
    whole = _learner(tiny_model, names=VARIED, seed=15, **cfg)
    chunked = _learner(tiny_model, names=VARIED, seed=15, class_chunk=chunk, **cfg)
    assert len(chunked.chunks(chunk)) >= len(VARIED) // (2 * chunk)  # about `chunk` classes each
    _assert_same(
        _values_and_grads(chunked, chunked.forward, weights),
        _values_and_grads(whole, whole.forward, weights),
    )


def test_class_chunks_match_one_pass_custom_block_and_fallback_towers(custom_block_model):
    bidir = _native_model("tiny-bidir-chunks", no_causal_mask=True, pool_type="last")
    for loaded, path in [(custom_block_model, "shared-prefix"), (bidir, "full")]:
        names = VARIED[:12]
        weights = torch.randn(len(names), 32, generator=torch.Generator().manual_seed(16))
        whole = _learner(loaded, names=names, seed=17)
        chunked = _learner(loaded, names=names, seed=17, class_chunk=5)
        assert chunked.fast_path == path
        _assert_same(
            _values_and_grads(chunked, chunked.forward, weights),
            _values_and_grads(whole, whole.forward_plain, weights),
        )


@pytest.mark.parametrize("cfg", [dict(n_ctx=4), dict(method="full-prompt")])
def test_class_chunks_match_plain_hf(tiny_hf_model, cfg):
    weights = torch.randn(len(NAMES), 16, generator=torch.Generator().manual_seed(18))
    whole = _learner(tiny_hf_model, seed=19, **cfg)
    chunked = _learner(tiny_hf_model, seed=19, class_chunk=2, **cfg)
    assert len(whole.chunks(None)[0].groups) >= 2  # classes computed to different lengths
    _assert_same(
        _values_and_grads(chunked, chunked.forward, weights),
        _values_and_grads(whole, whole.forward_plain, weights),
    )


def _saved_bytes(fn) -> int:
    """Bytes of the tensors autograd keeps for the backward of ``fn()`` (the activations)."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def test_class_chunks_keep_no_activations_for_the_backward(tiny_model):
    def saved(names, chunk):
        learner = _learner(tiny_model, names=names, class_chunk=chunk)
        return _saved_bytes(learner), sum(p.numel() * 4 for p in learner.parameters())

    whole_small, _ = saved(VARIED[:12], 0)
    whole_large, _ = saved(VARIED, 0)
    chunked_small, params = saved(VARIED[:12], 4)
    chunked_large, _ = saved(VARIED, 4)
    assert whole_large > whole_small > 10 * params  # one pass keeps activations that grow with classes
    assert chunked_small == chunked_large == params  # chunks keep only the learnable tensors


def test_no_grad_text_pass_is_chunked(tiny_model, monkeypatch):
    import promptcli.models.prompt_learner as module

    learner = _learner(tiny_model, names=VARIED)
    with torch.no_grad():
        expected = learner()
    calls = []
    original = learner._features
    monkeypatch.setattr(
        learner, "_features", lambda chunk, *a: calls.append(len(chunk.rows)) or original(chunk, *a)
    )
    monkeypatch.setattr(module, "NO_GRAD_CLASS_CHUNK", 10)
    with torch.no_grad():
        torch.testing.assert_close(learner(), expected, **TOL)
    assert len(calls) >= 3 and calls == [len(c.rows) for c in learner.chunks(10)] and sum(calls) == 24
    calls.clear()
    learner().sum().backward()  # with gradient and class_chunk 0: one pass
    assert calls == [24]


def test_class_chunk_is_validated_and_not_part_of_the_prompt():
    with pytest.raises(InputError, match="class chunk must be 0") as info:
        PromptConfig(class_chunk=-1).validate()
    assert info.value.where == "--class-chunk"
    config = PromptConfig(class_chunk=64)
    assert not any("chunk" in key for key in config.to_metadata())
    assert PromptConfig.from_metadata({**config.to_metadata(), "prompt.class_chunk": "64"}).class_chunk == 0


def test_gradients_are_bit_identical_across_runs_with_threads(tiny_hf_model):
    """The shared context is gathered into every class's row; a backward through plain indexing
    accumulates its gradient in a thread-dependent order on CPU (seen on the demo model at 2 threads)."""
    words = ["red", "apple", "blue", "sky", "green", "grass", "x", "t", "shirt"]
    names = [f"{a} {b}" for a in words for b in words][:72]  # 72 x 16 x 32 gathered: past torch's grain
    learner = _learner(tiny_hf_model, names, n_ctx=16)
    weights = torch.randn(len(names), learner().shape[-1], generator=torch.Generator().manual_seed(1))

    def grads() -> dict[str, torch.Tensor]:
        learner.zero_grad()
        (learner() * weights).sum().backward()
        return {n: p.grad.clone() for n, p in learner.named_parameters() if p.grad is not None}

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        first = grads()
        assert first
        for _ in range(5):
            again = grads()
            assert all(torch.equal(first[n], again[n]) for n in first)
    finally:
        torch.set_num_threads(threads)


# --------------------------------------------------------------------------- CoOp's construction, written out


def _coop_reference(loaded, ctx: torch.Tensor, position: str) -> torch.Tensor:
    """The class text features as CoOp's prompt learner builds them, from open_clip's own modules: each class
    prompt "X ... X name." is tokenised, its token embeddings are cut into the start token, the class-name
    tokens and the rest ("." end-of-text, padding), and the context vectors (n_ctx, width; or per class,
    (C, n_ctx, width)) are put in at ``position``; then CLIP's text transformer, the end-of-text row, the
    projection."""
    model, tokenizer = loaded.model, loaded.tokenizer
    n_ctx = ctx.shape[-2]
    rows = []
    for c, name in enumerate(NAMES):
        ids = tokenizer([" ".join(["X"] * n_ctx) + f" {name}."])
        emb = model.token_embedding(ids)[0]
        n_name = len(tokenizer.encode(name))
        start, context = emb[:1], ctx[c] if ctx.dim() == 3 else ctx
        name_part, rest = emb[1 + n_ctx : 1 + n_ctx + n_name], emb[1 + n_ctx + n_name :]
        if position == "end":
            parts = [start, context, name_part, rest]
        elif position == "front":
            parts = [start, name_part, context, rest]
        else:  # middle: half the context, the name, the other half
            half = n_ctx // 2
            parts = [start, context[:half], name_part, context[half:], rest]
        rows.append((torch.cat(parts), int(ids[0].argmax())))
    x = torch.stack([r for r, _ in rows]) + model.positional_embedding
    x = model.ln_final(model.transformer(x, attn_mask=model.attn_mask))
    pooled = x[torch.arange(len(rows)), torch.tensor([eot for _, eot in rows])]
    return torch.nn.functional.normalize(pooled @ model.text_projection, dim=-1)


@pytest.mark.parametrize("csc", [False, True])
@pytest.mark.parametrize("position", ["end", "middle", "front"])
def test_trained_coop_context_gives_coops_text_features(tiny_model, position, csc):
    """Away from its initialisation (where zero-shot checks it), the learner still computes what CoOp's code
    computes for the same context vectors: values and gradients."""
    learner = _learner(tiny_model, n_ctx=4, class_position=position, csc=csc)
    with torch.no_grad():
        learner.ctx.add_(torch.randn(learner.ctx.shape, generator=torch.Generator().manual_seed(3)) * 0.5)
    ctx = learner.ctx.detach().clone().requires_grad_(True)
    expected = _coop_reference(tiny_model, ctx, position)
    weights = torch.randn(expected.shape, generator=torch.Generator().manual_seed(4))
    for features in (learner(), learner.forward_plain()):
        torch.testing.assert_close(features, expected, **TOL)
    (learner() * weights).sum().backward()
    (expected * weights).sum().backward()
    torch.testing.assert_close(learner.ctx.grad, ctx.grad, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(
    ("template", "ok"),
    [
        ("a photo of a {}.", True),
        ("{{a}} photo of {}", True),
        ("a {}} photo", False),
        ("{{}", False),
        ("{", False),
        ("{}{}", False),
        ("{:d}", False),
        ("{x}", False),
        ("{0}", False),
        ("{!r}", False),
        ("{{}}", False),
    ],
)
def test_check_template_takes_one_bare_field(template, ok):
    from promptcli.models.zeroshot import check_template

    if ok:
        assert check_template(template).format("cat")
    else:
        with pytest.raises(InputError, match="must contain exactly one"):
            check_template(template)
