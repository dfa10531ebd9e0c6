"""From the model's distribution over single years of age to what a user reads, and how good it is.

Every model predicts a distribution over years 0..max_age (label-distribution learning: the target is a
Gaussian around the true age, Gao et al. 2017). Here, without TensorFlow:

- `answers`: one answer per face that never contradicts itself: an age group, an age that lies inside
  it, the group's probability as the confidence, and an interval holding the true age with a stated
  probability (`Answers`);
- `tempered` and `fit_temperature`: calibration, so that a stated confidence of 70% is right 70% of the
  time on faces the model never saw (Guo et al. 2017, temperature scaling);
- `evaluate`: accuracy, one-off accuracy, macro-F1, balanced and population-weighted accuracy, MAE,
  per-group recall, the confusion matrix, the calibration error and the interval's coverage;
- `correct_prior`: predictions re-weighted to another population's age mix;
- `reliability` (the calibration diagram's table) and `fairness` (the figures per gender or race,
  adjusted to one common age mix).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import pandas as pd

from agepipe.data.age_groups import AgeGroups
from agepipe.data.datasets import read_metadata_csv
from agepipe.errors import UserError

log = logging.getLogger("agepipe.estimates")

CALIBRATION_BINS = 10
# The figures a model is judged by, in the order the report card and the benchmarks show them.
HEADLINE = (
    "accuracy",
    "one_off_accuracy",
    "macro_f1",
    "balanced_accuracy",
    "population_weighted_accuracy",
    "mae_years",
)


def year_targets(ages, max_age: int, sigma_years: float) -> np.ndarray:
    """Row i: the target distribution over years 0..max_age for a person aged ages[i].

    A Gaussian of `sigma_years` around the age (one-hot for 0), so a 39-year-old's target also
    credits 38 and 40: neighbouring years are near misses, not errors.

    Examples
    --------
    >>> year_targets([2], max_age=4, sigma_years=0).tolist()
    [[0.0, 0.0, 1.0, 0.0, 0.0]]
    """
    ages = np.clip(np.asarray(ages, np.float64), 0, max_age)[:, None]
    years = np.arange(max_age + 1)[None, :]
    if sigma_years == 0:
        return (years == np.round(ages)).astype(np.float32)
    density = np.exp(-0.5 * ((years - ages) / sigma_years) ** 2)
    return (density / density.sum(axis=1, keepdims=True)).astype(np.float32)


def group_matrix(groups: AgeGroups, max_age: int) -> np.ndarray:
    """(max_age + 1, groups) 0/1 matrix: year probabilities @ this = group probabilities."""
    matrix = np.zeros((max_age + 1, len(groups.labels)), np.float32)
    for index, (lower, upper) in enumerate(groups.bounds(max_age)):
        matrix[lower : upper + 1, index] = 1.0
    return matrix


def expected_age(year_probabilities: np.ndarray) -> np.ndarray:
    return year_probabilities @ np.arange(year_probabilities.shape[1])


def correct_prior(
    year_probabilities: np.ndarray, groups: AgeGroups, max_age: int, training_shares, target_shares
) -> np.ndarray:
    """Re-weight predictions learnt under the training set's age mix to another population's mix:
    p'(year) is proportional to p(year) x target share / training share of the year's group (Bayes' rule
    with a changed prior; Saerens et al. 2002). A group the training set had no face of gets no weight:
    the model knows nothing of it, and dividing by its empty share would move answers there.

    Examples
    --------
    >>> groups = AgeGroups((0, 50))
    >>> correct_prior(np.full((1, 101), 1 / 101), groups, 100, [1.0, 0.0], [0.5, 0.5]) @ group_matrix(groups, 100)
    array([[1., 0.]])
    """
    training = np.asarray(training_shares, float)
    ratio = np.divide(np.asarray(target_shares, float), training, out=np.zeros_like(training), where=training > 0)
    return reweighted_by_group(year_probabilities, ratio, group_matrix(groups, max_age))


def reweighted_by_group(year_probabilities: np.ndarray, factors: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """Each year's probability times its group's factor (one per group, or a row of them per face), renormalised."""
    adjusted = year_probabilities * (np.atleast_2d(factors) @ matrix.T)
    return adjusted / np.maximum(adjusted.sum(axis=1, keepdims=True), 1e-12)


# --------------------------------------------------------------------------------------------------
# Calibration
# --------------------------------------------------------------------------------------------------
def tempered_groups(group_probabilities: np.ndarray, temperature: float) -> np.ndarray:
    """Age-group distributions sharpened (temperature < 1) or softened (> 1): g ** (1 / T), renormalised
    over the groups that hold any probability (a group without any stays without).

    Examples
    --------
    >>> tempered_groups(np.array([[0.2, 0.8, 0.0]]), 0.5).round(3).tolist()
    [[0.059, 0.941, 0.0]]
    """
    logs = np.log(np.maximum(group_probabilities, 1e-12)) / temperature
    weights = np.exp(logs - logs.max(axis=1, keepdims=True)) * (group_probabilities > 1e-12)
    return weights / weights.sum(axis=1, keepdims=True)


def tempered(year_probabilities: np.ndarray, temperature: float, groups: AgeGroups, max_age: int) -> np.ndarray:
    """The year distributions whose age groups are tempered (`tempered_groups`), the years of a group
    keeping their shares of it.

    Tempering groups, not years, never changes which group is likeliest nor where inside it the age lies:
    the model's years mix networks of different widths, and sharpening years moved answers.

    Examples
    --------
    >>> years = np.array([[0.1, 0.1, 0.8]])  # groups 0-1 and 2+: 0.2 and 0.8
    >>> tempered(years, 0.5, AgeGroups((0, 2)), max_age=2).round(3).tolist()
    [[0.029, 0.029, 0.941]]
    """
    matrix = group_matrix(groups, max_age)
    group = year_probabilities @ matrix
    scale = np.divide(tempered_groups(group, temperature), group, out=np.zeros_like(group), where=group > 1e-12)
    return reweighted_by_group(year_probabilities, scale, matrix)


def fit_temperature(year_probabilities: np.ndarray, true_ages, groups: AgeGroups, max_age: int) -> float:
    """The temperature that makes the age-group probabilities honest on held-out faces: the one that
    minimises the negative log-likelihood of the true groups (a bounded one-dimensional search)."""
    from scipy.optimize import minimize_scalar

    group = year_probabilities @ group_matrix(groups, max_age)
    true = (np.arange(len(group)), np.array([groups.index_of(a) for a in true_ages]))

    def loss(log_temperature: float) -> float:
        probabilities = tempered_groups(group, float(np.exp(log_temperature)))
        return float(-np.log(np.maximum(probabilities[true], 1e-12)).mean())

    return float(np.exp(minimize_scalar(loss, bounds=(np.log(0.1), np.log(10.0)), method="bounded").x))


def reliability(confidence: np.ndarray, correct: np.ndarray, bins: int = CALIBRATION_BINS) -> pd.DataFrame:
    """The reliability diagram's table: per equal-width confidence bin that holds answers, their number,
    mean stated confidence and accuracy.

    Examples
    --------
    >>> reliability(np.array([0.9, 0.9, 0.6, 0.6]), np.array([True, True, True, False])).to_dict("list")
    {'bin': [6, 9], 'answers': [2, 2], 'confidence': [0.6, 0.9], 'accuracy': [0.5, 1.0]}
    """
    confidence, correct = np.asarray(confidence, float), np.asarray(correct, float)
    which = np.minimum((confidence * bins).astype(int), bins - 1)
    table = pd.DataFrame({"bin": which, "confidence": confidence, "accuracy": correct}).groupby("bin")
    return table.agg(
        answers=("confidence", "size"), confidence=("confidence", "mean"), accuracy=("accuracy", "mean")
    ).reset_index()


def calibration_error(confidence: np.ndarray, correct: np.ndarray, bins: int = CALIBRATION_BINS) -> float:
    """Expected calibration error: the answer-weighted gap between stated confidence and accuracy, over
    equal-width confidence bins (`reliability`).

    Examples
    --------
    >>> calibration_error(np.array([0.9, 0.9, 0.6, 0.6]), np.array([True, True, True, False]))
    0.1
    """
    table = reliability(confidence, correct, bins)
    return round(
        float(
            (table["answers"] * (table["confidence"] - table["accuracy"]).abs()).sum() / max(1, table["answers"].sum())
        ),
        6,
    )


# --------------------------------------------------------------------------------------------------
# Answers
# --------------------------------------------------------------------------------------------------
@dataclass
class Answers:
    """One answer per face: `group` (index), `age` inside that group, `confidence` (the group's
    probability), and the interval [low, high] of years holding the given share of the probability."""

    group: np.ndarray
    age: np.ndarray
    confidence: np.ndarray
    low: np.ndarray
    high: np.ndarray
    group_probabilities: np.ndarray

    def compact(self, rows) -> "Answers":
        """The answers of `rows` (a mask or indices) with what evaluate needs, in 18 bytes a row: no
        per-group probabilities (an empty column each), and narrow number types."""
        return Answers(
            self.group[rows].astype(np.int16),
            self.age[rows].astype(np.float32),
            self.confidence[rows].astype(np.float32),
            self.low[rows].astype(np.int16),
            self.high[rows].astype(np.int16),
            np.empty((len(self.group[rows]), 0), np.float32),
        )

    @staticmethod
    def concatenate(parts: list["Answers"]) -> "Answers":
        """The answers of `parts` (at least one), one after another."""
        return Answers(*(np.concatenate([getattr(part, field.name) for part in parts]) for field in fields(Answers)))


def interval_columns(interval: float) -> tuple[str, str]:
    """The names of an answer's interval bounds, by the percentiles they are: 0.8 gives p10 and p90.

    Examples
    --------
    >>> interval_columns(0.8)
    ('predicted_age_p10', 'predicted_age_p90')
    """
    low = 100 * (1 - interval) / 2
    return f"predicted_age_p{low:g}", f"predicted_age_p{100 - low:g}"


def answer_columns(answer: Answers, groups: AgeGroups, interval: float, shown: np.ndarray | None = None) -> dict:
    """The columns of a prediction CSV (prediction's and the test split's alike), named as the CSV
    vocabulary says (agepipe/data/vocabulary.py): what is predicted says so (`predicted_...`), `age`
    is always a label; rows `shown` marks False (no finite answer) are empty."""
    shown = np.ones(len(answer.group), bool) if shown is None else shown
    low, high = interval_columns(interval)
    columns = {
        "predicted_age_group": np.where(shown, [groups.labels[g] for g in answer.group], None),
        "predicted_age_group_confidence": np.where(shown, np.round(answer.confidence, 4), np.nan),
        "predicted_age": np.where(shown, answer.age, np.nan),
        low: np.where(shown, answer.low, np.nan),
        high: np.where(shown, answer.high, np.nan),
    }
    for index, label in enumerate(groups.labels):
        columns[f"p_{label}"] = np.where(shown, np.round(answer.group_probabilities[:, index], 4), np.nan)
    return columns


def answers(
    year_probabilities: np.ndarray, groups: AgeGroups, max_age: int, rule: str = "group_first", interval: float = 0.8
) -> Answers:
    """The answer to read from each distribution over years, by `rule`:

    - "group_first": the most probable age group, and the median age within it;
    - "median": the distribution's median age, and the group holding it;
    - "mean": the expected age, and the group holding it.

    Whatever the rule, the age lies inside the group. The interval holds `interval` of the probability,
    as much below it as above.

    Examples
    --------
    >>> years = np.zeros((1, 101)); years[0, [8, 25, 26]] = [0.4, 0.3, 0.3]
    >>> answer = answers(years, AgeGroups((0, 10, 20, 30)), 100)
    >>> int(answer.group[0]), float(answer.age[0]), round(float(answer.confidence[0]), 2)
    (2, 25.0, 0.6)
    >>> int(answer.low[0]), int(answer.high[0])
    (8, 26)
    """
    matrix = group_matrix(groups, max_age)
    group_probabilities = year_probabilities @ matrix
    cumulative = np.cumsum(year_probabilities, axis=1)
    total = cumulative[:, -1:]
    median = _quantile(cumulative, 0.5 * total)
    bounds = np.array(groups.bounds(max_age))
    if rule == "group_first":
        group = group_probabilities.argmax(axis=1)
        within = year_probabilities * matrix[:, group].T
        age = _quantile(np.cumsum(within, axis=1), 0.5 * within.sum(axis=1, keepdims=True)).astype(float)
    else:
        age = median.astype(float) if rule == "median" else np.clip(expected_age(year_probabilities), 0, max_age)
        group = np.array([groups.index_of(a) for a in np.floor(age)])
        age = np.clip(age, bounds[group, 0], bounds[group, 1])
    tail = (1 - interval) / 2
    return Answers(
        group,
        np.round(age, 1),
        group_probabilities[np.arange(len(group)), group],
        _quantile(cumulative, tail * total),
        _quantile(cumulative, (1 - tail) * total),
        group_probabilities,
    )


def _quantile(cumulative: np.ndarray, levels: np.ndarray) -> np.ndarray:
    """Per row, the first year whose cumulative probability reaches the row's level."""
    return (cumulative < levels).sum(axis=1)


# --------------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------------
def evaluate(
    year_probabilities: np.ndarray,
    true_ages,
    groups: AgeGroups,
    max_age: int,
    population_shares=None,
    rule: str = "group_first",
    interval: float = 0.8,
) -> dict:
    """How good the answers (`answers`, by `rule`) are against the true ages: accuracy, one-off accuracy
    (within one adjacent group), macro-F1 and balanced accuracy over the groups present, accuracy
    weighted by a population's group shares (when given: what accuracy would be on people drawn from
    that population), per-group recall (None for a group with no test images), the confusion matrix
    (rows: true), the MAE in years of the answered age, the calibration error of the confidence and
    the share of true ages inside the interval."""
    return evaluate_answers(
        answers(year_probabilities, groups, max_age, rule, interval), true_ages, groups, max_age, population_shares
    )


def evaluate_answers(answer: Answers, true_ages, groups: AgeGroups, max_age: int, population_shares=None) -> dict:
    """evaluate's figures for answers already read from the distributions."""
    true_ages = np.asarray(true_ages, float)
    classes = len(groups.labels)
    true_groups = np.array([groups.index_of(a) for a in true_ages], dtype=int)
    predicted = answer.group
    confusion = np.zeros((classes, classes), int)
    np.add.at(confusion, (true_groups, predicted), 1)
    recall, f1 = {}, []
    for index, label in enumerate(groups.labels):
        support, hits, predicted_count = confusion[index].sum(), confusion[index, index], confusion[:, index].sum()
        recall[label] = None if support == 0 else float(hits / support)
        if support:
            precision = hits / predicted_count if predicted_count else 0.0
            f1.append(0.0 if hits == 0 else float(2 * precision * recall[label] / (precision + recall[label])))
    present = [r for r in recall.values() if r is not None]
    weighted = None
    if population_shares is not None:
        shares = np.array(
            [s if recall[label] is not None else 0.0 for label, s in zip(groups.labels, population_shares)]
        )
        weighted = float(sum(s * (recall[label] or 0.0) for label, s in zip(groups.labels, shares)) / shares.sum())
    clipped = np.minimum(true_ages, max_age)
    return {
        "images": int(len(true_groups)),
        "accuracy": float((predicted == true_groups).mean()),
        "one_off_accuracy": float((np.abs(predicted - true_groups) <= 1).mean()),
        "macro_f1": float(np.mean(f1)) if f1 else None,
        "balanced_accuracy": float(np.mean(present)) if present else None,
        "population_weighted_accuracy": weighted,
        "mae_years": float(np.abs(answer.age - clipped).mean()),
        "calibration_error": calibration_error(answer.confidence, predicted == true_groups),
        "interval_coverage": float(((answer.low <= clipped) & (clipped <= answer.high)).mean()),
        "per_group_recall": recall,
        "groups_without_test_images": [label for label, value in recall.items() if value is None],
        "confusion_matrix": confusion.tolist(),
    }


def fairness(
    year_probabilities: np.ndarray,
    true_ages,
    attribute,
    names: dict,
    groups: AgeGroups,
    max_age: int,
    rule: str,
    interval: float,
    min_images: int,
) -> dict:
    """How the answers do for each value of one demographic attribute (such as gender or race, coded
    as `names` says): images, accuracy, one-off accuracy, MAE, and the age-mix-adjusted accuracy, each
    value's per-age-group recall weighted by one common age mix (that of all `true_ages`), so that a
    value whose faces are mostly of an easy age does not look better for it; then the gap in adjusted
    accuracy between the best and the worst value with at least `min_images` images.

    Examples
    --------
    >>> years = year_targets(np.array([5, 5, 35, 35]), 100, 0)  # right about every face
    >>> groups = AgeGroups((0, 10, 20, 30))
    >>> table = fairness(years, [5, 5, 35, 35], [0, 1, 0, 1], {0: "a", 1: "b"}, groups, 100, "median", 0.8, 1)
    >>> table["values"]["a"]["age_mix_adjusted_accuracy"], table["adjusted_accuracy_gap"]
    (1.0, 0.0)
    """
    true_ages, attribute = np.asarray(true_ages, float), pd.Series(attribute).to_numpy()
    true_groups = [groups.index_of(a) for a in true_ages]
    common = np.bincount(true_groups, minlength=len(groups.labels)) / max(1, len(true_groups))
    values = {}
    for code in pd.unique(attribute[pd.notna(attribute)]):
        members = attribute == code
        result = evaluate(year_probabilities[members], true_ages[members], groups, max_age, common, rule, interval)
        values[str(names.get(code, names.get(str(code), code)))] = {
            "images": result["images"],
            "accuracy": result["accuracy"],
            "one_off_accuracy": result["one_off_accuracy"],
            "mae_years": result["mae_years"],
            "age_mix_adjusted_accuracy": result["population_weighted_accuracy"],
        }
    ranked = sorted((v["age_mix_adjusted_accuracy"], name) for name, v in values.items() if v["images"] >= min_images)
    gap = ranked[-1][0] - ranked[0][0] if len(ranked) >= 2 else None
    return {
        "values": values,
        "min_images": min_images,
        "adjusted_accuracy_gap": gap,
        "best": ranked[-1][1] if gap is not None else None,
        "worst": ranked[0][1] if gap is not None else None,
    }


def population_shares(target_csv: str | None, groups: AgeGroups, what: str = "target_csv") -> list[float] | None:
    """Group shares of the demographics stage's target CSV (group, share) when it is given; None, said
    in the log, when it is given but not there yet (run australian_population.ipynb)."""
    if not target_csv:
        return None
    if not Path(target_csv).exists():
        log.warning(
            "%s %s not found (run australian_population.ipynb): no population-weighted figures", what, target_csv
        )
        return None
    table = read_metadata_csv(target_csv, what, required=("group", "share"))
    shares = pd.to_numeric(table["share"], errors="coerce").to_numpy(float)
    if list(table["group"]) != groups.labels or not np.isfinite(shares).all() or (shares < 0).any():
        raise UserError(f"{what} {target_csv} does not hold a share for each configured group {groups.labels}")
    scale = shares.max(initial=0.0)
    if scale <= 0:
        raise UserError(f"{what} {target_csv} gives every group a share of 0")
    shares = shares / scale  # first: shares near the float limit would overflow their sum
    return (shares / shares.sum()).tolist()
