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


def render(metrics: dict, figures: dict[str, str]) -> str:
    """`figures` maps a figure's role to its path relative to reports/."""
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
    parts.append(_section("Zero-shot classification", zero_shot, ["top1", "top5", "chance_top1", "n", "n_classes"]))
    if "confusion" in figures:
        parts.append(f"![zero-shot confusion matrix]({figures['confusion']})\n")

    retrieval = metrics["retrieval"]
    if "skipped" in retrieval:
        parts.append(_section("Retrieval", retrieval))
    else:
        ks = list(retrieval["text_to_image"])
        lines = ["| direction | " + " | ".join(ks) + " |", "| --- |" + " ---: |" * len(ks)]
        for direction in ("text_to_image", "image_to_text"):
            lines.append(f"| {direction.replace('_', ' ')} | " + " | ".join(_fmt(retrieval[direction][k]) for k in ks) + " |")
        parts += [
            "## Retrieval",
            "",
            f"{retrieval['n_images']} images, {retrieval['n_texts']} captions. Text->image: every caption is a query; "
            "image->text: a hit when any of the image's captions is in the top K.",
            "",
            "\n".join(lines),
            "",
        ]
        if "heatmap" in figures:
            parts.append(f"![image-caption similarity heatmap]({figures['heatmap']})\n")
        if "examples" in figures:
            parts.append(
                "Captions searched in the FAISS index over the whole gallery; the caption's own image is "
                f"framed in green, scores are cosine similarities.\n\n![text-to-image retrieval examples]({figures['examples']})\n"
            )

    parts.append(_section("Index", metrics["index"], ["factory", "metric", "n", "dim", "recall@10", "qps", "build_s"]))
    parts.append("Recall@10 here is the share of exact-search top-10 neighbours the index returns.\n")
    if "training_curve" in figures:
        parts += ["## Training", "", f"![training curves]({figures['training_curve']})", ""]
    parts.append(_section("Timing (seconds per stage)", metrics["timing"]))
    return "\n".join(parts)
