"""ITM on dense input (semantic segmentation, DESIGN.md §5): every labelled position is a sample, the split is by
image, the score is pixel accuracy (or mean IoU) over the scoring images' labelled positions."""
import dataclasses

import numpy as np
import pytest

import itm

SMALL = dict(iterations=40, batch_size=64, eval_every=20)


def dense_blobs(sep, seed=0, N=60, h=6, w=6, D=16, K=4, ignore_frac=0.2):
    """Label maps at 4× the feature grid (blocks of one class) with some ignored pixels, and features
    N×h×w×D whose class means are `sep` apart; the same label maps for every `sep` (seeded by seed)."""
    rng = np.random.default_rng(seed)
    grid = rng.integers(0, K, (N, h, w))
    unlabelled = rng.random(grid.shape) < ignore_frac / 2                # whole cells without labels
    maps = np.kron(np.where(unlabelled, itm.IGNORE, grid), np.ones((4, 4), dtype=np.int64))  # N×4h×4w
    maps[rng.random(maps.shape) < ignore_frac] = itm.IGNORE            # and scattered ignored pixels
    means = np.random.default_rng(99).standard_normal((K, D))
    noise = np.random.default_rng(seed + 1).standard_normal((N, h, w, D))
    return (sep * means[grid] + noise).astype(np.float32), maps


def test_downsample_hand_made():
    maps = np.array([[[0, 0, 1, 1],
                      [0, 2, 1, 255],
                      [255, 255, 3, 3],
                      [255, 255, 3, 2]]])
    got = itm.downsample_labels(maps, 2, 2)
    # cell (0,0): 0,0,0,2 → 0; (0,1): 1,1,1 → 1; (1,0): only ignored → 255; (1,1): 3,3,3,2 → 3
    assert got.tolist() == [[[0, 1], [255, 3]]]
    tie = np.array([[[2, 1], [255, 255]]])                              # one 2, one 1: the smaller wins
    assert itm.downsample_labels(tie, 1, 1).tolist() == [[[1]]]
    uneven = np.array([[[5, 5, 7], [5, 7, 7]]])                         # 2×3 → 1×2: columns {0} and {1,2}
    assert itm.downsample_labels(uneven, 1, 2).tolist() == [[[5, 7]]]
    assert itm.downsample_labels(maps, 4, 4).tolist() == maps.tolist()  # same grid: unchanged


@pytest.mark.parametrize("bad, message", [
    (np.full((1, 4, 4), 300), "class ids 0..254"),
    (np.full((1, 4, 4), -1), "class ids 0..254"),
    (np.zeros((1, 4, 4), dtype=np.float32), "integers"),
    (np.zeros((1, 2, 2), dtype=np.int64), "smaller than the feature grid"),
])
def test_downsample_bad_maps(bad, message):
    with pytest.raises(ValueError, match=message):
        itm.downsample_labels(bad, 3, 3)


def test_split_by_image_is_disjoint_and_covers_labelled_positions():
    F, maps = dense_blobs(1.0)
    plan = itm.make_plan(F, maps, **SMALL)
    N, h, w, _ = F.shape
    image = np.arange(N * h * w) // (h * w)
    train_images, score_images = set(image[plan.train_idx]), set(image[plan.score_idx])
    assert not train_images & score_images
    k = itm.Config().folds                              # fold 0 of the default cross-fitting, by image
    assert len(score_images) in (N // k, -(-N // k))
    labelled = np.flatnonzero(plan.y >= 0)
    assert sorted(np.r_[plan.train_idx, plan.score_idx]) == labelled.tolist()
    assert np.all(np.diff(plan.score_idx) > 0)          # scoring positions in image order
    assert set(plan.batches.ravel()) <= set(plan.train_idx)


def test_scores_follow_separation():
    scores = [itm.itm_score(*dense_blobs(sep), **SMALL).score for sep in (0.0, 0.4, 0.8, 1.6)]
    assert scores == sorted(scores) and scores[-1] - scores[0] > 30, scores


def test_ignored_positions_change_nothing():
    F, maps = dense_blobs(1.0)
    grid = itm.downsample_labels(maps, F.shape[1], F.shape[2])
    G = F.copy()
    G[grid == itm.IGNORE] = np.random.default_rng(5).standard_normal((int(np.sum(grid == itm.IGNORE)),
                                                                      F.shape[3])) * 10
    assert np.any(grid == itm.IGNORE)
    a, b = itm.itm_score(F, maps, **SMALL), itm.itm_score(G, maps, **SMALL)
    assert a.score == b.score and a.n == b.n and np.array_equal(a.losses, b.losses)


def test_dense_equals_flattened_classification_with_the_same_split():
    """With the split made identical, a dense run is a classification run on the flattened positions:
    the same n, centres, batches, losses and score."""
    F, maps = dense_blobs(1.0, ignore_frac=0.0)
    cfg = itm.Config(**SMALL, preprocess="none")
    dense = itm.make_plan(F, maps, cfg)
    E, y = F.reshape(-1, F.shape[-1]), dense.y
    flat = itm.make_plan(E, y, cfg)
    n, dis = itm.adaptive_n(E, dense.train_idx, y, dense.classes.size, cfg)
    mu, sigma = itm.feature_moments(E, dense.train_idx, False)
    same_split = dataclasses.replace(flat, train_idx=dense.train_idx, score_idx=dense.score_idx,
                                     batches=dense.batches, params=dense.params, n=n, dis=dis,
                                     centres=mu + sigma * np.eye(dense.classes.size))
    assert dense.n == n and np.allclose(dense.centres, same_split.centres, rtol=1e-12)
    same_split.centres = dense.centres          # equal to rounding; the runs below must match exactly
    traj_d, loss_d = itm.train(dense)
    traj_c, loss_c = itm.train(same_split)
    assert traj_d == traj_c and np.array_equal(loss_d, loss_c)


def test_miou_option_and_reference():
    pred = np.array([0, 0, 1, 1, 2, 2])
    y = np.array([0, 1, 1, 1, 2, 0])
    # class 0: tp 1, fp 1, fn 1 → 1/3; class 1: tp 2, fp 0, fn 1 → 2/3; class 2: tp 1, fp 1, fn 0 → 1/2
    assert itm.mean_iou(pred, y, 3) == pytest.approx(100 * (1 / 3 + 2 / 3 + 1 / 2) / 3)
    F, maps = dense_blobs(1.0)
    acc, miou = itm.itm_score(F, maps, **SMALL), itm.itm_score(F, maps, metric="miou", **SMALL)
    assert 0 < miou.score <= 100 and miou.score != acc.score


def test_dense_bad_input():
    F, maps = dense_blobs(1.0)
    with pytest.raises(ValueError, match="label maps N×H×W"):
        itm.itm_score(F, maps[:5], **SMALL)
    with pytest.raises(ValueError, match="no labelled pixel"):
        itm.itm_score(F, np.full_like(maps, itm.IGNORE), **SMALL)
    with pytest.raises(ValueError, match="segmentation"):
        itm.itm_score(F[:, 0, 0], maps[:, 0, 0], task="segmentation", **SMALL)
    with pytest.raises(ValueError, match="at least 2 images"):
        itm.itm_score(F[:1], maps[:1], iterations=2, batch_size=8)


def test_cli_ranks_dense_npz(tmp_path, capsys):
    feats = {f"m{i}": dense_blobs(sep)[0] for i, sep in enumerate((0.2, 1.5))}
    np.savez(tmp_path / "dense.npz", labels=dense_blobs(0.2)[1], **feats)
    argv = ["--features", str(tmp_path / "dense.npz"), "--quiet", "--iterations", "40",
            "--batch-size", "64", "--eval-every", "20"]
    assert itm.main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split()[1] == "m1" and lines[2].split()[1] == "m0"
