"""The three losses (paper eq. 1-2 and section 3.2) on examples small enough to check by hand."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from scanclust.losses import masked_cross_entropy, nt_xent, per_cluster_mask, scan_loss


def test_scan_loss_hand_example() -> None:
    # Log-probabilities as logits: softmax gives back exactly these probabilities.
    p_anchor = torch.tensor([[0.8, 0.2], [0.3, 0.7]])
    p_neighbor = torch.tensor([[0.6, 0.4], [0.1, 0.9]])
    # <p_a, p_n>: 0.8*0.6 + 0.2*0.4 = 0.56 ; 0.3*0.1 + 0.7*0.9 = 0.66
    consistency = -(math.log(0.56) + math.log(0.66)) / 2
    # p̄ = ((0.8+0.3)/2, (0.2+0.7)/2) = (0.55, 0.45)
    entropy = -(0.55 * math.log(0.55) + 0.45 * math.log(0.45))
    total = consistency - 5.0 * entropy  # ≈ 0.4976 - 5 * 0.6881 ≈ -2.943
    got_total, got_consistency, got_entropy = scan_loss(torch.log(p_anchor), torch.log(p_neighbor), 5.0)
    assert got_consistency.item() == pytest.approx(consistency, rel=1e-6)
    assert got_entropy.item() == pytest.approx(entropy, rel=1e-6)
    assert got_total.item() == pytest.approx(total, rel=1e-6)


def test_scan_loss_multi_head_equals_per_head_calls() -> None:
    torch.manual_seed(0)
    anchors, neighbors = torch.randn(3, 4, 5), torch.randn(3, 4, 5)
    total, consistency, entropy = scan_loss(anchors, neighbors, 2.0)
    assert total.shape == consistency.shape == entropy.shape == (3,)
    for h in range(3):
        t, c, e = scan_loss(anchors[h], neighbors[h], 2.0)
        torch.testing.assert_close(total[h], t)
        torch.testing.assert_close(consistency[h], c)
        torch.testing.assert_close(entropy[h], e)


def test_scan_loss_confident_agreeing_spread_predictions() -> None:
    # 8 samples, 4 clusters, each sample confidently in cluster i % 4, neighbour agrees:
    # <p_a, p_n> ≈ 1 so consistency ≈ 0; the batch mean is uniform so entropy = log 4.
    logits = 50.0 * F.one_hot(torch.arange(8) % 4, 4).float()
    total, consistency, entropy = scan_loss(logits, logits.clone(), 5.0)
    assert consistency.item() == pytest.approx(0.0, abs=1e-6)
    assert entropy.item() == pytest.approx(math.log(4), rel=1e-6)
    assert total.item() == pytest.approx(-5 * math.log(4), rel=1e-6)


def test_scan_loss_backward_and_float32_for_bf16_logits() -> None:
    torch.manual_seed(0)
    anchors = torch.randn(4, 3).bfloat16().requires_grad_()
    neighbors = torch.randn(4, 3).bfloat16().requires_grad_()
    total, consistency, entropy = scan_loss(anchors, neighbors, 5.0)
    assert total.dtype == consistency.dtype == entropy.dtype == torch.float32
    total.backward()
    assert anchors.grad is not None and neighbors.grad is not None
    assert anchors.grad.abs().sum() > 0 and neighbors.grad.abs().sum() > 0


def _confident_batch() -> tuple[torch.Tensor, torch.Tensor]:
    # Weak-view max probabilities: 0.95 (class 1), 0.6, 0.99 (class 0), 0.5 -> 2 of 4 above 0.9.
    weak = torch.log(torch.tensor([[0.05, 0.95], [0.6, 0.4], [0.99, 0.01], [0.5, 0.5]]))
    strong = torch.tensor([[0.2, 1.0], [3.0, -1.0], [0.5, -0.5], [1.0, 2.0]])
    return weak, strong


def test_masked_cross_entropy_without_balance() -> None:
    weak, strong = _confident_batch()
    loss, count = masked_cross_entropy(weak, strong, 0.9, class_balance=False)
    assert count == 2
    expected = F.cross_entropy(strong[[0, 2]], torch.tensor([1, 0]))
    # by hand: (log(1 + e^-0.8) + log(1 + e^-1)) / 2
    by_hand = (math.log(1 + math.exp(-0.8)) + math.log(1 + math.exp(-1.0))) / 2
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert loss.item() == pytest.approx(by_hand, rel=1e-6)


def test_masked_cross_entropy_class_balance_is_mean_of_class_means() -> None:
    # Three confident samples of classes [0, 0, 1] (and one unconfident).
    weak = torch.log(torch.tensor([[0.98, 0.02], [0.97, 0.03], [0.01, 0.99], [0.5, 0.5]]))
    strong = torch.tensor([[2.0, 0.0], [0.0, 1.0], [0.0, 3.0], [5.0, -5.0]])
    ce = F.cross_entropy(strong, torch.tensor([0, 0, 1, 0]), reduction="none")
    expected = ((ce[0] + ce[1]) / 2 + ce[2]) / 2
    loss, count = masked_cross_entropy(weak, strong, 0.9, class_balance=True)
    assert count == 3
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    # and not the plain mean, which would weigh class 0 twice
    assert loss.item() != pytest.approx(ce[:3].mean().item(), rel=1e-3)


def test_masked_cross_entropy_nothing_confident() -> None:
    weak = torch.zeros(3, 4)  # uniform: max prob 0.25
    strong = torch.randn(3, 4, requires_grad=True)
    loss, count = masked_cross_entropy(weak, strong, 0.9)
    assert loss.item() == 0.0 and count.item() == 0
    loss.backward()  # a step the caller skips: no sample moves the weights
    assert strong.grad.abs().sum() == 0


@pytest.mark.parametrize("balance", [False, True])
def test_masked_cross_entropy_equals_cross_entropy_on_the_confident_rows(balance: bool) -> None:
    # The mask weights rows instead of selecting them (static shapes for CUDA graphs): the
    # value must still be torch's weighted cross-entropy on the selected rows.
    torch.manual_seed(0)
    weak, strong = torch.randn(64, 5) * 3, torch.randn(64, 5)
    loss, count = masked_cross_entropy(weak, strong, 0.8, class_balance=balance)
    probs = weak.softmax(dim=1)
    keep = probs.max(dim=1).values > 0.8
    target = probs.argmax(dim=1)[keep]
    weight = None
    if balance:
        counts = torch.bincount(target, minlength=5).float()
        weight = torch.where(counts > 0, 1 / counts.clamp_min(1), 0.0)
    expected = F.cross_entropy(strong[keep], target, weight=weight)
    assert count.item() == int(keep.sum()) > 10
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_masked_cross_entropy_weak_view_gets_no_gradient() -> None:
    weak, strong = _confident_batch()
    weak.requires_grad_()
    strong.requires_grad_()
    loss, _ = masked_cross_entropy(weak, strong, 0.9, class_balance=False)
    loss.backward()
    assert weak.grad is None
    # only the two confident rows of the strong view receive a gradient
    assert strong.grad[[1, 3]].abs().sum() == 0
    assert strong.grad[[0, 2]].abs().sum() > 0


def test_nt_xent_identical_views() -> None:
    # z1 = z2 = (e1, e2), temperature 1: each anchor sees [partner 1, others 0, 0].
    z = torch.eye(2)
    expected = -math.log(math.e / (math.e + 2))
    assert nt_xent(z, z.clone(), 1.0).item() == pytest.approx(expected, rel=1e-6)


def test_nt_xent_orthogonal_partners() -> None:
    # z1 = (e1, e2), z2 = (e2, e1): each partner has similarity 0, one negative has 1.
    # Temperature 0.5: logits [partner 0, negatives 0 and 2] -> -log(1 / (2 + e^2)).
    z1, z2 = torch.eye(2), torch.eye(2).flip(0)
    expected = math.log(2 + math.exp(2))
    assert nt_xent(z1, z2, 0.5).item() == pytest.approx(expected, rel=1e-6)


def test_nt_xent_symmetric_in_views() -> None:
    torch.manual_seed(0)
    z1 = F.normalize(torch.randn(5, 8), dim=1)
    z2 = F.normalize(torch.randn(5, 8), dim=1)
    torch.testing.assert_close(nt_xent(z1, z2, 0.1), nt_xent(z2, z1, 0.1))


def test_scan_loss_with_the_uniform_prior_is_the_paper_loss_plus_log_c() -> None:
    torch.manual_seed(0)
    anchor, neighbor = torch.randn(2, 3, 16, 5)
    plain = scan_loss(anchor, neighbor, 5.0)[0]
    uniform = scan_loss(anchor, neighbor, 5.0, prior=torch.full((5,), 0.2))[0]
    # KL(p || u) = log C - H(p), so consistency + w KL = consistency - w H + w log C
    assert torch.allclose(uniform, plain + 5.0 * math.log(5), atol=1e-5)


def test_scan_loss_prior_divergence_by_hand() -> None:
    # every sample predicts cluster 0 with certainty: p_mean = (1, 0); prior (0.8, 0.2):
    # KL = 1 * log(1 / 0.8); consistency -log(1) = 0
    logits = torch.tensor([[30.0, -30.0]] * 4)
    total, consistency, entropy = scan_loss(logits, logits, 2.0, prior=torch.tensor([0.8, 0.2]))
    assert float(consistency) == pytest.approx(0.0, abs=1e-6)
    assert float(total) == pytest.approx(2.0 * math.log(1 / 0.8), abs=1e-5)
    assert float(entropy) == pytest.approx(0.0, abs=1e-5)


def test_per_cluster_mask_keeps_each_clusters_most_confident_share() -> None:
    # cluster 0: confidences 0.9, 0.5, 0.7, 0.6 -> with 0.5 the top ceil(2) = 0.9 and 0.7;
    # cluster 1: 0.3 alone -> ceil(0.5) = 1 keeps it; cluster 2: 0.4, 0.4 -> 1, the earlier
    confidence = torch.tensor([0.9, 0.5, 0.3, 0.7, 0.4, 0.6, 0.4])
    target = torch.tensor([0, 0, 1, 0, 2, 0, 2])
    mask = per_cluster_mask(confidence, target, 3, 0.5)
    assert mask.tolist() == [1, 0, 1, 1, 1, 0, 0]
    assert per_cluster_mask(confidence, target, 3, 1.0).tolist() == [1] * 7


def test_masked_cross_entropy_per_cluster_trains_where_nothing_passes_the_threshold() -> None:
    weak = torch.tensor([[2.0, 0.0], [1.0, 0.0], [0.0, 1.5], [0.0, 0.5]])  # all below 0.99
    strong = torch.zeros(4, 2)
    loss, count = masked_cross_entropy(weak, strong, 0.99, class_balance=False)
    assert int(count) == 0 and float(loss) == 0.0
    loss, count = masked_cross_entropy(weak, strong, 0.99, class_balance=False, fraction=0.5)
    assert int(count) == 2  # the most confident of cluster 0 (row 0) and of cluster 1 (row 2)
    assert float(loss) == pytest.approx(math.log(2), abs=1e-6)  # uniform strong logits
