"""Length grouping and class chunking on their own: general batches of prompt rows (as a CoCoOp-style
learner, one prefix per image, would give them), against the straightforward computation."""

from __future__ import annotations

import pytest
import torch

from conftest import write_synthetic_features
from promptcli.io.prompt_files import read_prompt
from promptcli.models.prompt_learner import _text_tower
from promptcli.models.text_packing import chunked_rows, group_by_length, plan_chunks, restore_order

LENGTHS = [3, 1, 5, 3, 2, 5, 1, 4, 3, 2]


def test_group_by_length_puts_every_row_in_the_group_of_its_length():
    groups = group_by_length(LENGTHS)
    assert [g.length for g in groups] == [1, 2, 3, 4, 5]
    rows = torch.cat([g.rows for g in groups]).tolist()
    assert sorted(rows) == list(range(len(LENGTHS)))
    assert all(LENGTHS[r] == g.length for g in groups for r in g.rows.tolist())
    with pytest.raises(ValueError, match="row 1 needs 0 tokens"):
        group_by_length([2, 0])


@pytest.mark.parametrize("size", [None, 0, 1, 3, 4, 10, 50])
def test_plan_chunks_covers_every_row_once_in_chunks_of_equal_tokens(size):
    chunks = plan_chunks(LENGTHS, size)
    if not size or size >= len(LENGTHS):
        assert len(chunks) == 1
    else:  # at most size x the mean length of tokens per chunk (or a single row)
        budget = size * sum(LENGTHS) / len(LENGTHS)
        tokens = [sum(LENGTHS[r] for r in c.rows.tolist()) for c in chunks]
        assert all(t <= budget or len(c.rows) == 1 for t, c in zip(tokens, chunks))
        assert len(chunks) > 1
    assert sorted(torch.cat([c.rows for c in chunks]).tolist()) == list(range(len(LENGTHS)))
    for chunk in chunks:  # groups index into the chunk and agree with the lengths
        for g in chunk.groups:
            assert all(LENGTHS[int(chunk.rows[i])] == g.length for i in g.rows.tolist())
    # taken in order of length: a later chunk never holds a shorter row than an earlier one
    firsts = [min(LENGTHS[r] for r in c.rows.tolist()) for c in chunks]
    lasts = [max(LENGTHS[r] for r in c.rows.tolist()) for c in chunks]
    assert all(a <= b for a, b in zip(lasts, firsts[1:]))


def test_restore_order():
    values = torch.arange(4.0).unsqueeze(1) * 10
    assert restore_order(values, torch.tensor([2, 0, 3, 1])).squeeze(1).tolist() == [10.0, 30.0, 0.0, 20.0]


def test_chunked_rows_gives_the_values_and_gradients_of_one_pass():
    gen = torch.Generator().manual_seed(0)
    rows_in = torch.randn(10, 6, generator=gen)
    weight = torch.randn(6, 6, generator=gen, requires_grad=True)
    bias = torch.randn(6, generator=gen, requires_grad=True)
    upstream = torch.randn(10, 6, generator=gen)

    def compute(chunk):
        return torch.tanh(rows_in[chunk.rows] @ weight + bias) * rows_in[chunk.rows].sum(1, keepdim=True)

    def run(size):
        weight.grad = bias.grad = None
        out = chunked_rows(compute, plan_chunks(LENGTHS, size), len(LENGTHS), [weight, bias])
        (out * upstream).sum().backward()
        return out.detach(), weight.grad.clone(), bias.grad.clone()

    whole = run(None)
    for size in (1, 3, 7):
        for a, b in zip(run(size), whole):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(
            chunked_rows(compute, plan_chunks(LENGTHS, 3), 10, [weight, bias]), whole[0]
        )
    with pytest.raises(ValueError, match="chunks cover 3 rows, expected 10"):
        chunked_rows(compute, plan_chunks(LENGTHS[:3], 2), 10, [weight, bias])


def test_packed_encoder_with_one_prefix_per_image_matches_full_sequences(tiny_model):
    """Rows continuing different prefixes (B images x C classes in CoCoOp) packed by length."""
    tower = _text_tower(tiny_model.model)
    gen = torch.Generator().manual_seed(1)
    n_prefix, longest = 4, max(LENGTHS)
    prefix = (0.02 * torch.randn(3, n_prefix, tower.width, generator=gen)).requires_grad_()
    suffix = (0.02 * torch.randn(len(LENGTHS), longest, tower.width, generator=gen)).requires_grad_()
    prefix_of = torch.randint(3, (len(LENGTHS),), generator=gen)
    upstream = torch.randn(len(LENGTHS), 32, generator=gen)

    packed = tower.encode_packed(prefix, suffix, group_by_length(LENGTHS), prefix_of)
    (packed * upstream).sum().backward()
    packed_grads = prefix.grad.clone(), suffix.grad.clone()
    prefix.grad = suffix.grad = None

    # the straightforward way: each row's whole sequence, padded, pooled at its last token
    x = torch.cat([prefix[prefix_of], suffix], dim=1)
    lengths = torch.tensor(LENGTHS)
    pad = torch.arange(n_prefix + longest) >= (n_prefix + lengths).unsqueeze(1)
    x = x.masked_fill(pad.unsqueeze(-1), 0.0)  # causal: what follows the pooled token cannot matter
    ids = torch.zeros(x.shape[:2], dtype=torch.long)
    plain = tower.encode(x, ids, n_prefix + lengths - 1)
    (plain * upstream).sum().backward()

    torch.testing.assert_close(packed, plain, atol=2e-6, rtol=0)
    for got, want in zip(packed_grads, (prefix.grad, suffix.grad)):
        assert want.abs().max() > 0
        # gradients of order 100 here: float32 rounding of sums over many rows
        torch.testing.assert_close(got, want, atol=1e-6 * float(want.abs().max()), rtol=1e-4)


def test_tune_class_chunk_trains_the_same_prompt_and_records_it(tiny_model, tmp_path, run_cli, one_thread):
    names = ["cat", "dog", "sports car", "maple tree", "garter snake"]
    features = tmp_path / "syn.h5"
    _, y, paths = write_synthetic_features(features, tiny_model, names, 4, 0.3, 0)
    labels = tmp_path / "labels.csv"
    labels.write_text("path,label\n" + "".join(f"{p},{names[c]}\n" for p, c in zip(paths, y)))
    base = [features, labels, "--epochs", "2", "--n-ctx", "4", "--device", "cpu", "-q", "--no-views"]
    prompts = {}
    for chunk in ("0", "2"):
        out = tmp_path / f"chunk{chunk}.safetensors"
        code, _, err = run_cli("tune", *base, "--class-chunk", chunk, "-o", out)
        assert code == 0, err
        prompts[chunk] = read_prompt(out)
    torch.testing.assert_close(prompts["2"].tensors["ctx"], prompts["0"].tensors["ctx"], atol=1e-6, rtol=1e-5)
    assert prompts["2"].metadata["class_chunk"] == 2 and "class_chunk" not in prompts["0"].metadata
    code, _, err = run_cli("tune", *base, "--class-chunk", "-1", "-o", tmp_path / "bad.safetensors")
    assert code == 2 and "--class-chunk" in err and "Traceback" not in err
