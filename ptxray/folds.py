"""Patient-grouped, stratified fold assignment that every machine computes identically.

A patient's images never straddle folds (or the hold-out), otherwise validation leaks through
near-duplicate radiographs of one person. Folds are stratified by "pneumothorax present" so each
fold's positive rate is close to the data set's (about 22 % on SIIM).

Order independence: the inputs are sorted by image id before any randomness is used, and the
result is returned in the caller's order, so two workers that list files differently agree. The
assignment is a function of (image ids, patient ids, labels, num_folds, seed, holdout_fraction)
and of the scikit-learn version (its shuffling is an implementation detail): a sweep's workers
share one environment, and the assignment is saved with each run.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

HOLDOUT = -1


def _validate(
    image_ids: Sequence[str],
    patient_ids: Sequence[str],
    positive: Sequence[bool],
    num_folds: int,
    holdout_fraction: float,
) -> None:
    n = len(image_ids)
    if len(patient_ids) != n or len(positive) != n:
        raise ValueError(
            f"assign_folds: image_ids, patient_ids and positive must have one entry per image; "
            f"got {n}, {len(patient_ids)} and {len(positive)}"
        )
    if num_folds < 2:
        raise ValueError(f"assign_folds: num_folds must be at least 2, got {num_folds}")
    if not 0.0 <= holdout_fraction < 1.0:
        raise ValueError(f"assign_folds: holdout_fraction must be in [0, 1), got {holdout_fraction}")
    seen: set[str] = set()
    for image_id, patient_id in zip(image_ids, patient_ids):
        if image_id in seen:
            raise ValueError(f"assign_folds: image {image_id} is listed more than once")
        seen.add(image_id)
        if patient_id is None or str(patient_id) == "":
            # One shared "unknown" patient would form a giant group that unbalances the folds.
            raise ValueError(
                f"assign_folds: image {image_id} has no patient id; pass its image id as its "
                "patient id if the patient is unknown"
            )


def _holdout_patients(
    patients: np.ndarray, patient_positive: np.ndarray, fraction: float, seed: int
) -> np.ndarray:
    """Boolean mask over `patients` (sorted, unique) of those set aside as the hold-out."""
    from sklearn.model_selection import train_test_split

    n = patients.size
    # Split patients, not images: grouping then holds by construction, and the fraction is exact
    # for any value (StratifiedGroupKFold with round(1/fraction) splits only gives 1/k fractions;
    # GroupShuffleSplit does not stratify).
    n_test = int(round(fraction * n))
    if n_test == 0:
        return np.zeros(n, dtype=bool)
    if n_test >= n:
        raise ValueError(
            f"assign_folds: holdout_fraction {fraction} of {n} patients leaves none for the folds"
        )
    index = np.arange(n)
    try:
        _, test = train_test_split(
            index, test_size=n_test, random_state=seed, shuffle=True, stratify=patient_positive
        )
    except ValueError:
        # Stratification needs >= 2 patients per class and room for both classes in each part;
        # with so few positive (or negative) patients a plain shuffle is the honest fallback.
        _, test = train_test_split(index, test_size=n_test, random_state=seed, shuffle=True)
    held = np.zeros(n, dtype=bool)
    held[test] = True
    return held


def assign_folds(
    image_ids: Sequence[str],
    patient_ids: Sequence[str],
    positive: Sequence[bool],
    num_folds: int = 5,
    seed: int = 0,
    holdout_fraction: float = 0.0,
) -> np.ndarray:
    """Fold index (0..num_folds-1) per image, in the caller's order; -1 marks the hold-out.

    The hold-out is drawn first, as a `holdout_fraction` of the patients, stratified by whether a
    patient has any positive image. The remaining images are split with scikit-learn's
    StratifiedGroupKFold (groups = patients, classes = pneumothorax present).
    """
    from sklearn.model_selection import StratifiedGroupKFold

    _validate(image_ids, patient_ids, positive, num_folds, holdout_fraction)
    n = len(image_ids)
    ids = np.asarray([str(i) for i in image_ids], dtype=object)
    order = np.argsort(ids, kind="stable")  # canonical order: by image id
    sorted_patients = np.asarray([str(patient_ids[i]) for i in order])
    sorted_positive = np.asarray([bool(positive[i]) for i in order])

    patients, patient_index = np.unique(sorted_patients, return_inverse=True)  # sorted unique
    patient_positive = np.zeros(patients.size, dtype=bool)
    np.logical_or.at(patient_positive, patient_index, sorted_positive)

    held_patient = _holdout_patients(patients, patient_positive, holdout_fraction, seed)
    held = held_patient[patient_index]  # (n,) in sorted order
    remaining = np.flatnonzero(~held)
    n_remaining_patients = int((~held_patient).sum())
    if n_remaining_patients < num_folds:
        extra = f" after the hold-out of {int(held_patient.sum())}" if held_patient.any() else ""
        raise ValueError(
            f"assign_folds: {n_remaining_patients} patient(s){extra} cannot fill {num_folds} folds; "
            "each fold needs at least one patient (lower num_folds or add data)"
        )

    sorted_folds = np.full(n, HOLDOUT, dtype=np.int64)
    splitter = StratifiedGroupKFold(n_splits=num_folds, shuffle=True, random_state=seed)
    strata = sorted_positive[remaining]
    if np.all(np.bincount(strata, minlength=2) < num_folds):
        # scikit-learn refuses to stratify when every class is smaller than num_folds (tiny smoke
        # data sets); one constant class keeps the same grouped, shuffled, size-balanced split.
        strata = np.zeros_like(strata)
    splits = splitter.split(np.zeros(remaining.size), strata, groups=patient_index[remaining])
    for fold, (_, test) in enumerate(splits):
        sorted_folds[remaining[test]] = fold

    folds = np.empty(n, dtype=np.int64)
    folds[order] = sorted_folds
    return folds


def fold_summary(folds: Sequence[int] | np.ndarray, positive: Sequence[bool]) -> list[dict]:
    """One row per fold (hold-out -1 first if present): images, positives and positive rate."""
    folds = np.asarray(folds)
    positive = np.asarray(positive, dtype=bool)
    if folds.shape != positive.shape:
        raise ValueError(
            f"fold_summary: folds and positive must have one entry per image; "
            f"got {folds.size} and {positive.size}"
        )
    rows = []
    for fold in np.unique(folds):
        members = folds == fold
        images = int(members.sum())
        positives = int(positive[members].sum())
        rows.append(
            {
                "fold": int(fold),
                "images": images,
                "positives": positives,
                "positive_rate": positives / images,
            }
        )
    return rows


__all__ = ["HOLDOUT", "assign_folds", "fold_summary"]
