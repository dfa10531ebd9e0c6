"""The model's report card: its plots and one HTML page beside `model.keras`, `report.html`.

The page shows the headline figures beside the majority baseline on the same test images, the
confusion matrix, the recall of each age group, a reliability diagram (is a stated 70% right 70% of
the time?), the learning curves with their held-out line, the fairness table (the figures per
gender and race when the test rows carry them, adjusted to one common age mix: estimates.fairness),
the funnel from the files found to the faces trained on (funnel.py), and a warning above all of them
where a figure rests on few test faces. train_model.py calls `write_report_card` with the metrics it saves; the page
is rendered from `templates/model_card.html` by Jinja2.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from agepipe.report.figures import figure_png
from agepipe.report.pages import render
from agepipe.running.output_guard import OutputFolder

PLOT_DPI = 100
FIGURE_NAMES = {
    "accuracy": "accuracy",
    "one_off_accuracy": "one-off accuracy (right or a neighbouring group)",
    "macro_f1": "macro-F1",
    "balanced_accuracy": "balanced accuracy (mean recall of the groups)",
    "population_weighted_accuracy": "accuracy weighted to the target population",
    "mae_years": "MAE of the age (years)",
}


def plot_history(history: pd.DataFrame, folder: OutputFolder) -> str:
    """Loss and age-group accuracy per epoch, on the training split and, when there is one, the held-out one."""
    import matplotlib.pyplot as plt

    figure, (loss, accuracy) = plt.subplots(1, 2, figsize=(11, 4), layout="constrained")
    for axes, metric, title in (
        (loss, "loss", "Loss (KL divergence to the age distribution)"),
        (accuracy, "group_accuracy", "Age-group accuracy"),
    ):
        axes.plot(history["epoch"] + 1, history[metric], label="training")
        if f"val_{metric}" in history.columns and history[f"val_{metric}"].notna().any():
            axes.plot(history["epoch"] + 1, history[f"val_{metric}"], label="validation (held out)")
        axes.set(title=title, xlabel="epoch")
        axes.grid(alpha=0.3)
        axes.legend()
    folder.write_bytes("training_curves.png", figure_png(figure, dpi=PLOT_DPI))
    return "training_curves.png"


def plot_confusion(confusion, labels: list[str], folder: OutputFolder, title: str) -> str:
    """Counts of true (rows) against predicted (columns) age group, shaded by the share of the true group."""
    import matplotlib.pyplot as plt

    confusion = np.asarray(confusion)
    rates = confusion / np.maximum(1, confusion.sum(axis=1, keepdims=True))
    figure, axes = plt.subplots(figsize=(7, 6), layout="constrained")
    image = axes.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    for (i, j), count in np.ndenumerate(confusion):
        axes.text(
            j, i, str(count), ha="center", va="center", color="white" if rates[i, j] > 0.5 else "black", fontsize=9
        )
    axes.set_xticks(range(len(labels)), labels, rotation=45)
    axes.set_yticks(range(len(labels)), labels)
    axes.set(xlabel="predicted group", ylabel="true group", title=title)
    figure.colorbar(image, label="share of the true group")
    folder.write_bytes("confusion_matrix.png", figure_png(figure, dpi=PLOT_DPI))
    return "confusion_matrix.png"


def plot_reliability(table: list[dict], bins: int, calibration_error: float, folder: OutputFolder) -> str:
    """Accuracy against stated confidence per confidence bin (dot area: answers); the diagonal is honest."""
    import matplotlib.pyplot as plt

    frame = pd.DataFrame(table)
    figure, axes = plt.subplots(figsize=(6, 5.5), layout="constrained")
    axes.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="honest confidence")
    if len(frame):
        axes.bar((frame["bin"] + 0.5) / bins, frame["accuracy"], width=0.9 / bins, color="#4C72B0", alpha=0.35)
        axes.scatter(
            frame["confidence"],
            frame["accuracy"],
            s=20 + 300 * frame["answers"] / frame["answers"].max(),
            color="#4C72B0",
            label="test answers (area: how many)",
            zorder=3,
        )
    axes.set(
        xlim=(0, 1),
        ylim=(0, 1),
        xlabel="stated confidence of the age group",
        ylabel="share right",
        title=f"Reliability (calibration error {calibration_error:.3f})",
    )
    axes.grid(alpha=0.3)
    axes.legend(loc="upper left")
    folder.write_bytes("reliability.png", figure_png(figure, dpi=PLOT_DPI))
    return "reliability.png"


def few_faces_warnings(test: dict, labels: list[str], min_images: int) -> list[str]:
    """What the card's figures rest on too few test faces for (fewer than `min_images`)."""
    warnings = []
    if test["images"] < min_images:
        warnings.append(
            f"Every figure below rests on {test['images']} test faces, fewer than {min_images}: "
            "read them as rough, and the calibration error as noise."
        )
    counts = dict(zip(labels, np.asarray(test["confusion_matrix"]).sum(axis=1).tolist()))
    few = [f"{label} ({count})" for label, count in counts.items() if 0 < count < min_images]
    if few:
        warnings.append(
            f"The recall of {', '.join(few)} rests on fewer than {min_images} test faces each: greyed, not to be "
            "ranked."
        )
    missing = [label for label, count in counts.items() if count == 0]
    if missing:
        warnings.append(f"No test faces at all in {', '.join(missing)}: their recall is not measured.")
    return warnings


def write_report_card(
    folder: OutputFolder, report: dict, history: pd.DataFrame, headline: tuple[str, ...], bins: int, min_images: int
) -> str:
    """Draw the plots and write report.html from the metrics `report` train_model.py saves; return its name.
    Figures resting on fewer than `min_images` test faces are greyed and warned of."""
    test = report["test"]
    labels = report["age_groups"]
    plots = {
        "confusion": plot_confusion(
            test["confusion_matrix"], labels, folder, f"Confusion matrix (accuracy {test['accuracy']:.1%})"
        ),
        "reliability": plot_reliability(test["reliability"], bins, test["calibration_error"], folder),
        "history": plot_history(history, folder),
    }
    rows = [
        {
            "name": FIGURE_NAMES.get(name, name),
            "model": test[name],
            "baseline": report["majority_baseline"][name],
            "years": name.endswith("years"),
        }
        for name in headline
    ]
    page = render(
        "model_card.html",
        report=report,
        test=test,
        headline=rows,
        plots=plots,
        labels=labels,
        warnings=few_faces_warnings(test, labels, min_images),
        min_images=min_images,
    )
    folder.write_text("report.html", page)
    return "report.html"
