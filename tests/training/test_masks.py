import pytest
import torch

from training.assemble import preset
from training.masks import bidirectional_mask, multimodal_causal_mask, unimodal_mask
from training.scoring import qformer_pass

Q = 2
TEXT_MASK = torch.tensor([[1, 1, 1, 0]])  # three tokens and one pad


def test_unimodal_mask_keeps_queries_and_text_apart():
    m = unimodal_mask(Q, TEXT_MASK)[0, 0]
    assert m.shape == (Q + 4, Q + 4)
    assert m[:Q, :Q].all() and not m[:Q, Q:].any()  # queries see queries only
    assert not m[Q:, :Q].any()  # text sees no query
    assert m[Q:, Q : Q + 3].all() and not m[:, Q + 3].any()  # text sees text, nobody sees the pad


def test_bidirectional_mask_sees_everything_but_padding():
    m = bidirectional_mask(Q, TEXT_MASK)[0, 0]
    assert m[:, : Q + 3].all()
    assert not m[:, Q + 3].any()


def test_multimodal_causal_mask():
    m = multimodal_causal_mask(Q, TEXT_MASK)[0, 0]
    assert m[:Q, :Q].all() and not m[:Q, Q:].any()  # queries never see text
    assert m[Q:, :Q].all()  # every text token sees every query
    text = m[Q:, Q:]
    assert torch.equal(text[:3, :3], torch.tril(torch.ones(3, 3, dtype=torch.bool)))  # earlier text only
    assert not text[:, 3].any()


@pytest.fixture(scope="module")
def stage1():
    model = preset("tiny-opt").stage1
    return model.eval()


def _outputs_before_and_after_changing_token(stage1, mask_fn, position: int):
    """Q-Former hidden states for [queries; text] before and after one text token is replaced."""
    torch.manual_seed(0)
    image = torch.randn(1, 65, 64)
    ids = torch.tensor([[2, 10, 11, 12, 3]])
    changed = ids.clone()
    changed[0, position] = 40
    mask = torch.ones_like(ids)
    with torch.no_grad():
        return qformer_pass(stage1, image, ids, mask, mask_fn), qformer_pass(
            stage1, image, changed, mask, mask_fn
        )


@pytest.mark.parametrize(
    ("mask_fn", "queries_move"),
    [(unimodal_mask, False), (multimodal_causal_mask, False), (bidirectional_mask, True)],
)
def test_changing_a_text_token_moves_query_outputs_only_under_the_itm_mask(stage1, mask_fn, queries_move):
    before, after = _outputs_before_and_after_changing_token(stage1, mask_fn, position=2)
    q = stage1.num_query_tokens
    assert torch.equal(before[:, :q], after[:, :q]) is not queries_move


def test_itg_text_position_sees_no_later_token(stage1):
    before, after = _outputs_before_and_after_changing_token(stage1, multimodal_causal_mask, position=3)
    q = stage1.num_query_tokens
    assert torch.equal(before[:, q : q + 3], after[:, q : q + 3])  # positions before the change
    assert not torch.equal(before[:, q + 3 :], after[:, q + 3 :])
