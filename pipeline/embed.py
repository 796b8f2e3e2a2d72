"""Stage 3: image, caption and class-prompt features -> artifacts/embeddings/.

    images/part-RRRRR.parquet   image_id, path, split, label, class_name, embedding
    texts/part-RRRRR.parquet    caption_id, image_id, split, embedding   (sources with captions)
    classes.parquet             index, name, embedding (template ensemble, encoded once)
    embed.json                  which model made them, counts (timings: reports/timing/embed.json)

One process writes shard 0. Under torchrun (`runtime.processes: N`, or `torchrun --nproc_per_node N
-m pipeline.embed`), rank r embeds the r-th of N contiguous blocks of rows (whole tar shards for a
WebDataset source, so each rank opens only its own) and writes shard r into one temporary folder,
so the shards concatenate to the one-process order; rank 0 writes the class prompts and
embed.json, and swaps the folder in when every rank is done, so the output folder is always
complete (a killed launch leaves the previous one).
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import pandas as pd
import typer

from pipeline import distributed, io, preflight
from pipeline import params as params_lib
from pipeline.models import load_trained
from pipeline.models.encode import encode_class_prompts, encode_images, encode_texts
from pipeline.prepared import block, load_prepared, rows_for_rank
from pipeline.stage import DATA_OPTION, MODEL_OPTION, PARAMS_OPTION, load_params, stage_app, timing_option, write_timing

IMAGE_META = ["image_id", "path", "split", "label", "class_name"]
TEXT_META = ["caption_id", "image_id", "split"]


def embed_into(folder: Path, params: params_lib.Params, data: Path, model_dir: Path, world: distributed.World) -> tuple[dict, dict]:
    """Write this rank's shards into `folder`; rank 0 adds the class prompts. Returns (counts, timing)."""
    runtime = params.runtime
    prepared = load_prepared(data)
    preflight.check_against_data(params, prepared)
    loaded, model_info = load_trained(model_dir, distributed.rank_device(runtime.device, world))
    shard = f"part-{world.rank:05d}.parquet"

    images = rows_for_rank(prepared, world.rank, world.size)  # WebDataset: whole shards per rank
    image_start = time.perf_counter()
    image_emb = encode_images(loaded, prepared.image_paths(images), runtime.batch_size, runtime.num_workers)
    image_s = time.perf_counter() - image_start
    io.write_embedding_shard(folder / "images" / shard, images[IMAGE_META], image_emb)

    n_texts = 0
    if prepared.captions is not None:
        captions = block(prepared.captions, world.rank, world.size)
        text_emb = encode_texts(loaded, captions["caption"].tolist(), runtime.batch_size)
        io.write_embedding_shard(folder / "texts" / shard, captions[TEXT_META], text_emb)
        n_texts = len(captions)

    if world.is_main:
        class_emb = encode_class_prompts(loaded, prepared.class_names, prepared.templates)
        classes = pd.DataFrame({"index": [c["index"] for c in prepared.classes], "name": prepared.class_names})
        io.write_embedding_shard(folder / "classes.parquet", classes, class_emb)
    counts = {
        "model": model_info,  # which model made these embeddings (artifacts/model/model.json)
        "dim": int(image_emb.shape[1]),
        "n_images": len(images),
        "n_texts": n_texts,
    }
    timing = {"images_per_s": round(len(images) / image_s, 1) if image_s > 0 else None, "device": str(loaded.device)}
    return counts, timing


def main(
    params_file: Path = PARAMS_OPTION,
    data: Path = DATA_OPTION,
    model_dir: Path = MODEL_OPTION,
    out: Path = typer.Option(Path("artifacts/embeddings"), help="embeddings folder (replaced atomically)"),
    timing: Path = timing_option("embed"),
) -> None:
    start = time.perf_counter()
    params = load_params(params_file)
    world = distributed.init(params.runtime.device)
    # Every rank writes its shards into one temporary folder that rank 0 made; rank 0 swaps it in
    # for `out` only after all ranks are done, so a killed launch leaves the old embeddings whole.
    with contextlib.ExitStack() as swap_in_at_exit:
        tmp = swap_in_at_exit.enter_context(io.atomic_dir(out)) if world.is_main else None
        folder = Path(world.from_main(str(tmp) if world.is_main else None))
        info, speed = embed_into(folder, params, data, model_dir, world)
        totals = world.all_objects(info)
        info = {**info, "n_images": sum(t["n_images"] for t in totals), "n_texts": sum(t["n_texts"] for t in totals)}
        if world.is_main:
            # How many processes wrote the shards is not recorded here: it changes speed, not content.
            io.write_json(folder / "embed.json", info)
        world.barrier()  # every shard is written before rank 0 swaps the folder in
    distributed.finish(world)
    if world.is_main:
        write_timing(timing, {"embed_s": round(time.perf_counter() - start, 3), **speed, "world_size": world.size})
        typer.echo(f"embedded {info['n_images']} images, {info['n_texts']} texts ({speed['images_per_s']} images/s on {speed['device']}) -> {out}")


app = stage_app(main, distributed=True)

if __name__ == "__main__":
    app()
