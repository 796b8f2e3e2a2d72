"""reports/report.md: the metrics as tables and the figures, readable on GitHub."""

from __future__ import annotations


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def _table(rows: list[tuple[str, object]], header: tuple[str, str] = ("metric", "value")) -> str:
    lines = [f"| {header[0]} | {header[1]} |", "| --- | ---: |"]
    lines += [f"| {name} | {_fmt(value)} |" for name, value in rows]
    return "\n".join(lines)


def _section(title: str, block: dict, keys: list[str] | None = None) -> str:
    if "skipped" in block:
        return f"## {title}\n\nSkipped: {block['skipped']}.\n"
    keys = keys or [k for k, v in block.items() if not isinstance(v, (dict, list))]
    return f"## {title}\n\n{_table([(k, block[k]) for k in keys if k in block])}\n"


def probe_table(probe: dict, figures: dict[str, str]) -> str:
    """Layer probe rows: k-NN on features cut at each depth, with the zero-shot baseline row."""
    if "skipped" in probe:
        return f"## Layer probe\n\nSkipped: {probe['skipped']}.\n"
    lines = [
        "## Layer probe",
        "",
        "k-NN vote over train-split features taken at each depth; the encoder stops at that depth. "
        "`zero_shot` is the full encoder with class prompts. The probe stage times the encoder and the index "
        "query apart, per test image over the whole split (warm-up excluded): `timing/probe.json` and the "
        "accuracy-vs-time figure below, both written by that stage (times are measurements, kept out of "
        "cached outputs).",
        "",
        "| probe | top1 | top5 | dim |",
        "| --- | ---: | ---: | ---: |",
    ]
    for name, row in probe.items():
        lines.append(f"| {name} | {_fmt(row['top1'])} | {_fmt(row.get('top5', '-'))} | {row['dim']} |")
    lines.append("")
    lines += [f"![{alt}]({figures[role]})\n" for role, alt in (("probe_tradeoff", "accuracy vs time"), ("probe_similarity", "top-1 neighbour similarity")) if role in figures]
    return "\n".join(lines)


def methods_table(methods: dict) -> str:
    """The rows of reports/methods.json (bench/compare_methods.py) side by side, per dataset."""
    rows = methods.get("rows", [])
    if not rows:
        return ""
    keys = [k for k in rows[0] if k not in ("dataset", "method")]
    overrides = methods.get("overrides", {})
    if not isinstance(overrides, dict):
        raise ValueError("methods.json: 'overrides' must map each dataset to its overrides (an older bench/compare_methods.py wrote one list); rerun it")
    lines = [
        "## Methods compared",
        "",
        f"From `{methods.get('generated_by', 'bench/compare_methods.py')}` ({methods.get('date', '')}), each method trained and "
        "evaluated with these overrides of params.yaml:",
        "",
        *(f"- {dataset}: `{' '.join(values)}`" for dataset, values in overrides.items()),
        "",
        "| dataset | method | " + " | ".join(keys) + " |",
        "| --- | --- |" + " ---: |" * len(keys),
    ]
    lines += [f"| {row.get('dataset', '')} | {row['method']} | " + " | ".join(_fmt(row.get(k)) for k in keys) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _per_class_table(zero_shot: dict, per_class: list[dict], split: str, max_rows: int = 20) -> str:
    """Images and top-1 per class (the whole table in plots/zero_shot_per_class.csv); with many
    classes, the `max_rows` worst."""
    counts = zero_shot["n_per_class"]
    spread = f"{counts['min']} each" if counts["min"] == counts["max"] else f"{counts['min']} to {counts['max']}"
    text = f"`{split}` images per class: {spread} (every class: `plots/zero_shot_per_class.csv`).\n"
    if not per_class:
        return text
    rows = sorted(per_class, key=lambda r: r["top1"])[:max_rows] if len(per_class) > max_rows else per_class
    header = f"class (the {max_rows} hardest of {len(per_class)})" if len(per_class) > max_rows else "class"
    lines = [f"| {header} | images | top-1 |", "| --- | ---: | ---: |"]
    lines += [f"| {r['class']} | {r['n']} | {_fmt(r['top1'])} |" for r in rows]
    return text + "\n" + "\n".join(lines) + "\n"


def merged_line(retrieval: dict) -> str:
    """What counting a candidate once per content merged, so a reader comparing with a published
    figure (which counts every row) knows when the two can differ."""
    merged = retrieval["merged"]
    t2i, i2t = retrieval["text_to_image"], retrieval["image_to_text"]
    if not merged["repeated_captions"] and not merged["identical_images"]:
        return "No caption string repeats and no image is an identical copy of another (the same decoded pixels): every row is its own candidate, as in CLIP_benchmark."
    return (
        f"A candidate is its content: {merged['repeated_captions']} captions repeat another caption's exact string and "
        f"{merged['identical_images']} images are identical copies of another (the same decoded pixels), each merged into one candidate "
        f"({t2i['n_candidates']} distinct images for {t2i['n_queries']} caption queries, {i2t['n_candidates']} distinct captions "
        f"for {i2t['n_queries']} image queries); retrieving any image that carries a caption's exact string is a hit. "
        "A published figure that counts every row as its own candidate can differ."
    )


def render(
    metrics: dict, figures: dict[str, str], not_drawn: dict[str, str] | None = None, per_class: list[dict] | None = None
) -> str:
    """The report of one evaluate run, from what that run computed only. `figures` maps a figure's
    role to its path relative to reports/; `not_drawn` maps the role of a figure that could not be
    drawn to the reason; `per_class` the zero-shot rows per class (class, n, top1)."""
    model, data = metrics["model"], metrics["dataset"]
    parts = [
        "# Evaluation report",
        "",
        f"Model **{model['name']}** (weights: `{model['pretrained']}`, training: `{model['method']}`) "
        f"on **{data['source']}** ({data['n_images']} images, {data['n_classes']} classes), "
        f"evaluated on the `{data['split']}` split. Regenerate with `dvc repro`; compare runs with "
        "`dvc metrics diff` and `dvc plots diff`.",
        "",
    ]
    zero_shot = metrics["zero_shot"]
    parts.append(_section("Zero-shot classification", zero_shot, ["top1", "top5", "chance_top1", "n", "n_classes", "n_classes_in_dataset"]))
    if "skipped" not in zero_shot:
        parts.append(f"Each image chooses among the {zero_shot['n_classes']} classes present in the `{data['split']}` split; chance is over them.\n")
        parts.append(_per_class_table(zero_shot, per_class or [], data["split"]))
    if "confusion" in figures:
        parts.append(f"![zero-shot confusion matrix]({figures['confusion']})\n")

    retrieval = metrics["retrieval"]
    if "skipped" in retrieval:
        parts.append(_section("Retrieval", retrieval))
    else:
        ks = [k for k in retrieval["text_to_image"] if k.startswith("R@")]
        lines = ["| direction | " + " | ".join(ks) + " |", "| --- |" + " ---: |" * len(ks)]
        for direction in ("text_to_image", "image_to_text"):
            lines.append(f"| {direction.replace('_', ' ')} | " + " | ".join(_fmt(retrieval[direction][k]) for k in ks) + " |")
        parts += [
            "## Retrieval",
            "",
            f"{retrieval['n_images']} images, {retrieval['n_texts']} captions. Text->image: every caption is a query; "
            "image->text: a hit when any of the image's captions is in the top K.",
            "",
            merged_line(retrieval),
            "",
            "\n".join(lines),
            "",
        ]
        if "heatmap" in figures:
            parts.append(f"![image-caption similarity heatmap]({figures['heatmap']})\n")
        if "examples" in figures:
            parts.append(
                "Captions searched in the FAISS index over the whole gallery; an image that carries the caption's exact "
                f"string (or an identical copy of one) is framed in green, scores are cosine similarities.\n\n![text-to-image retrieval examples]({figures['examples']})\n"
            )

    verification = metrics.get("verification", {"skipped": "not evaluated"})
    parts.append(
        _section(
            "Verification (same / different class)",
            verification,
            ["threshold", "threshold_split", "accuracy", "precision", "recall", "f1", "roc_auc", "eer", "n_pairs"],
        )
    )
    if "skipped" not in verification:
        c = verification["confusion"]
        parts += [
            f"The distance threshold was chosen on the `{verification['threshold_split']}` split (maximum accuracy) "
            f"and applied unchanged to `{data['split']}`. Pairs: same when distance <= threshold.",
            "",
            f"`clipline verify`'s P(same | distance) is a logistic fit on the `{verification['calibration']['fitted_on']}` pairs; "
            f"on the `{data['split']}` pairs its expected calibration error is {verification['calibration']['ece']:.3f} "
            f"(Brier score {verification['calibration']['brier']:.3f}).",
            "",
            "| actual \\ predicted | different | same |",
            "| --- | ---: | ---: |",
            f"| different | {c['tn']} | {c['fp']} |",
            f"| same | {c['fn']} | {c['tp']} |",
            "",
        ]
        figure_roles = (("verification_confusion", "verification confusion matrix"), ("distances", "pair distance histograms"), ("roc", "ROC curve"))
        parts += [f"![{alt}]({figures[role]})\n" for role, alt in figure_roles if role in figures]
    parts.append(
        _section("Retrieval within the image set", metrics.get("metric_learning", {"skipped": "not evaluated"}), ["precision_at_1", "r_precision", "map_at_r", "n_queries"])
    )
    parts.append(_section("Index", metrics["index"], ["factory", "metric", "n", "dim", "recall@10"]))
    parts.append("Recall@10 here is the share of exact-search top-10 neighbours the index returns; build time and "
                 "queries/s are in `timing/index.json`.\n")
    parts.append(probe_table(metrics.get("probe", {"skipped": "not run"}), figures))
    if "training_curve" in figures:
        parts += ["## Training", "", f"![training curves]({figures['training_curve']})", ""]
    if not_drawn:
        parts += ["## Figures not drawn", "", "The metrics above are complete; these figures failed on this run's data:", ""]
        parts += [f"- `{role}`: {reason}" for role, reason in not_drawn.items()] + [""]
    parts.append(
        "## Timing\n\nEach stage writes its wall-clock seconds (and the device it ran on) to `reports/timing/<stage>.json`; "
        "`dvc metrics show` lists them. They are kept out of this report and of every cached output, so that a rerun "
        "which reproduces the same results reruns nothing downstream.\n"
    )
    return "\n".join(parts)
