"""Patient-grouped, stratified, order-independent fold assignment."""

from __future__ import annotations

import warnings
from collections import defaultdict

import numpy as np
import pytest

from ptxray.folds import HOLDOUT, assign_folds, fold_summary


def synthetic(n_images: int = 1000, seed: int = 0):
    """Images of patients with 1-6 images each; a patient's images share a positive tendency."""
    rng = np.random.default_rng(seed)
    image_ids, patient_ids, positive = [], [], []
    patient = 0
    while len(image_ids) < n_images:
        count = int(rng.integers(1, 7))
        patient_rate = 0.6 if rng.random() < 0.3 else 0.05
        for _ in range(min(count, n_images - len(image_ids))):
            image_ids.append(f"1.2.276.{int(rng.integers(1e9))}.{len(image_ids)}")
            patient_ids.append(f"patient-{rng.integers(1e6):06d}-{patient}")
            positive.append(bool(rng.random() < patient_rate))
        patient += 1
    return image_ids, patient_ids, np.array(positive)


@pytest.fixture(scope="module")
def data():
    return synthetic()


def patients_by_fold(folds, patient_ids):
    seen = defaultdict(set)
    for fold, patient in zip(folds, patient_ids):
        seen[patient].add(int(fold))
    return seen


def test_deterministic_and_seed_dependent(data):
    ids, patients, positive = data
    a = assign_folds(ids, patients, positive, num_folds=5, seed=3)
    b = assign_folds(ids, patients, positive, num_folds=5, seed=3)
    c = assign_folds(ids, patients, positive, num_folds=5, seed=4)
    np.testing.assert_array_equal(a, b)
    assert (a != c).any()
    assert a.dtype.kind == "i" and a.shape == (len(ids),)
    assert set(a.tolist()) == set(range(5))


@pytest.mark.parametrize("holdout_fraction", [0.0, 0.2])
def test_independent_of_input_order(data, holdout_fraction):
    ids, patients, positive = data
    reference = assign_folds(ids, patients, positive, 5, seed=1, holdout_fraction=holdout_fraction)
    perm = np.random.default_rng(9).permutation(len(ids))
    shuffled = assign_folds(
        [ids[i] for i in perm],
        [patients[i] for i in perm],
        positive[perm].tolist(),
        5,
        seed=1,
        holdout_fraction=holdout_fraction,
    )
    # Returned in the caller's order: image perm[k] got shuffled[k].
    np.testing.assert_array_equal(shuffled, reference[perm])


@pytest.mark.parametrize("holdout_fraction", [0.0, 0.2])
def test_no_patient_in_two_folds(data, holdout_fraction):
    ids, patients, positive = data
    folds = assign_folds(ids, patients, positive, 5, seed=0, holdout_fraction=holdout_fraction)
    split_patients = [p for p, f in patients_by_fold(folds, patients).items() if len(f) > 1]
    assert split_patients == []


def test_positive_rate_per_fold_close_to_overall(data):
    ids, patients, positive = data
    folds = assign_folds(ids, patients, positive, num_folds=5, seed=0)
    overall = positive.mean()
    assert 0.1 < overall < 0.4  # the synthetic set is imbalanced, like SIIM
    rows = fold_summary(folds, positive)
    assert [r["fold"] for r in rows] == [0, 1, 2, 3, 4]
    for row in rows:
        assert abs(row["positive_rate"] - overall) < 0.03, row
        assert 150 <= row["images"] <= 250, row  # roughly equal sizes too


def test_holdout_is_a_fifth_of_patients_and_stratified(data):
    ids, patients, positive = data
    folds = assign_folds(ids, patients, positive, num_folds=5, seed=0, holdout_fraction=0.2)
    by_patient = patients_by_fold(folds, patients)
    held = {p for p, f in by_patient.items() if f == {HOLDOUT}}
    assert len(held) == round(0.2 * len(by_patient))
    image_share = float(np.mean(folds == HOLDOUT))
    assert 0.15 < image_share < 0.25
    patient_positive = defaultdict(bool)
    for patient, pos in zip(patients, positive):
        patient_positive[patient] |= bool(pos)
    overall = np.mean(list(patient_positive.values()))
    held_rate = np.mean([patient_positive[p] for p in held])
    assert abs(held_rate - overall) < 0.02
    # The rest still fill all K folds, and the hold-out changes nothing else's grouping.
    assert set(folds[folds != HOLDOUT].tolist()) == set(range(5))


def test_holdout_does_not_depend_on_num_folds(data):
    ids, patients, positive = data
    three = assign_folds(ids, patients, positive, num_folds=3, seed=2, holdout_fraction=0.2)
    five = assign_folds(ids, patients, positive, num_folds=5, seed=2, holdout_fraction=0.2)
    np.testing.assert_array_equal(three == HOLDOUT, five == HOLDOUT)


def test_too_few_patients():
    ids = [f"img{i}" for i in range(12)]
    patients = ["a", "b", "c"] * 4
    positive = [i % 2 == 0 for i in range(12)]
    with pytest.raises(ValueError, match=r"3 patient\(s\) cannot fill 5 folds"):
        assign_folds(ids, patients, positive, num_folds=5)
    with pytest.raises(ValueError, match=r"after the hold-out"):
        assign_folds(ids, patients, positive, num_folds=3, holdout_fraction=0.34)


def test_tiny_data_sets_still_fill_every_fold():
    # Every class smaller than num_folds: scikit-learn cannot stratify; the split stays grouped.
    ids = [f"img{i}" for i in range(8)]
    patients = ["p0", "p0", "p1", "p2", "p3", "p4", "p5", "p5"]
    positive = [True, True, False, True, False, False, True, False]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scikit-learn warns about the small classes
        folds = assign_folds(ids, patients, positive, num_folds=5, seed=0)
    assert set(folds.tolist()) == set(range(5))
    assert all(len(f) == 1 for f in patients_by_fold(folds, patients).values())


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"patient_ids": ["p"] * 3}, "one entry per image"),
        ({"image_ids": ["a", "b", "a", "c"]}, "image a is listed more than once"),
        ({"patient_ids": ["p1", "", "p2", "p3"]}, "image b has no patient id"),
        ({"num_folds": 1}, "at least 2"),
        ({"holdout_fraction": 1.0}, "holdout_fraction"),
        ({"holdout_fraction": -0.1}, "holdout_fraction"),
    ],
)
def test_invalid_inputs(kwargs, message):
    args = {
        "image_ids": ["a", "b", "c", "d"],
        "patient_ids": ["p1", "p2", "p3", "p4"],
        "positive": [True, False, False, True],
        "num_folds": 2,
    }
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        assign_folds(**args)


def test_fold_summary_counts():
    folds = np.array([0, 1, 1, -1, 0, 1])
    positive = [True, False, True, True, False, False]
    assert fold_summary(folds, positive) == [
        {"fold": -1, "images": 1, "positives": 1, "positive_rate": 1.0},
        {"fold": 0, "images": 2, "positives": 1, "positive_rate": 0.5},
        {"fold": 1, "images": 3, "positives": 1, "positive_rate": 1 / 3},
    ]
    with pytest.raises(ValueError, match="one entry per image"):
        fold_summary(folds, positive[:-1])
