"""``matchmap models``: the registry of model configs."""

from __future__ import annotations

import json

import click


def model_rows() -> list[dict]:
    """One dict per registered config: name, embed_dim, image input size and grid, audio rate out, params."""
    from encoders.config import get_config, list_models
    from encoders.models import count_parameters, image_grid_size

    rows = []
    for name in list_models():
        cfg = get_config(name)
        grid = image_grid_size(cfg.image)
        params = count_parameters(cfg)
        rows.append(
            {
                "name": name,
                "embed_dim": cfg.embed_dim,
                "image_arch": cfg.image.arch,
                "image_input_size": cfg.image.input_size,
                "image_grid": list(grid),
                "audio_frames_per_second": 1.0 / cfg.audio.output_frame_seconds,
                "params": params["total"],
                "image_params": params["image"],
                "audio_params": params["audio"],
            }
        )
    return rows


@click.command("models", epilog="\b\nExit codes:\n  0  listed\n  2  usage error (an unknown option)")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list instead of a table.")
def models(as_json: bool) -> None:
    """List the registered model configs: dims, input size, map grid, audio frame rate, parameters."""
    rows = model_rows()
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    header = (
        f"{'name':<16} {'embed':>5}  {'image':<10} {'input':>5} {'grid':>6}  {'audio fps':>9}  {'params':>8}"
    )
    click.echo(header)
    for r in rows:
        grid = "x".join(str(g) for g in r["image_grid"])
        click.echo(
            f"{r['name']:<16} {r['embed_dim']:>5}  {r['image_arch']:<10} {r['image_input_size']:>5} {grid:>6}  "
            f"{r['audio_frames_per_second']:>9.2f}  {r['params'] / 1e6:>7.2f}M"
        )
