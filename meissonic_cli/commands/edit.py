"""`meissonic edit`: inpaint, outpaint and mask-free editing by masking tokens (see `meissonic_cli.sample.edit`)."""

from __future__ import annotations

from typing import Optional

import typer

from meissonic_cli.config import help_of
from meissonic_cli.sample.edit import EditConfig
from meissonic_cli.sample.sample import SampleConfig
from ._common import handle_errors


def _h(name: str) -> str:
    return help_of(EditConfig, name)


def _s(name: str) -> str:
    return help_of(SampleConfig, name)


def register(app: typer.Typer) -> None:
    @app.command("edit", no_args_is_help=True)
    @handle_errors
    def edit_command(
        model: str = typer.Option(..., "--model", "-m", help=_h("model"), show_default=False),
        image: Optional[str] = typer.Option(None, "--image", "-i", help=_h("image"), show_default=False),
        prompt: Optional[str] = typer.Option(None, "--prompt", "-p", help=_h("prompt"), show_default=False),
        mode: str = typer.Option("inpaint", "--mode", help=_h("mode")),
        mask: Optional[str] = typer.Option(None, "--mask", help=_h("mask"), show_default=False),
        box: Optional[str] = typer.Option(None, "--box", help=_h("box"), show_default=False),
        dilate: int = typer.Option(0, "--dilate", help=_h("dilate")),
        blend: int = typer.Option(0, "--blend", help=_h("blend")),
        extend: Optional[str] = typer.Option(None, "--extend", help=_h("extend"), show_default=False),
        target: Optional[str] = typer.Option(None, "--target", help=_h("target"), show_default=False),
        strength: float = typer.Option(0.5, "--strength", help=_h("strength")),
        remask: str = typer.Option("random", "--remask", help=_h("remask")),
        resolution: Optional[str] = typer.Option(None, "--resolution", help=_h("resolution"), show_default=False),
        cases: Optional[str] = typer.Option(None, "--cases", help=_h("cases"), show_default=False),
        out: str = typer.Option("edits", "--out", "-o", help=_h("out")),
        name: Optional[str] = typer.Option(None, "--name", help=_h("name"), show_default=False),
        negative_prompt: str = typer.Option("", "--negative-prompt", help=_s("negative_prompt")),
        steps: int = typer.Option(48, "--steps", help=_s("steps")),
        cfg: float = typer.Option(9.0, "--cfg", help=_s("cfg")),
        seed: int = typer.Option(0, "--seed", help=_s("seed")),
        device: str = typer.Option("auto", "--device", help=_s("device")),
        dtype: str = typer.Option("fp32", "--dtype", help=_s("dtype")),
        temperature: str = typer.Option("2,0", "--temperature", help=_s("temperature")),
        token_temperature: float = typer.Option(1.0, "--token-temperature", help=_s("token_temperature")),
        allow_download: bool = typer.Option(False, "--allow-download", help=_s("allow_download")),
    ) -> None:
        """Edit images without training: inpaint (--mask/--box), outpaint (--extend/--target), or mask-free (--strength).

        Writes NAME.png + NAME.json (with the source path, for `meissonic eval`) to --out; reruns skip finished cases.
        """
        from rich.console import Console

        from meissonic_cli.sample.edit import run_edit, summary_table

        sampler = SampleConfig(model=model, negative_prompt=negative_prompt, steps=steps, cfg=cfg, seed=seed,
                               device=device, dtype=dtype, temperature=temperature, token_temperature=token_temperature,
                               allow_download=allow_download)
        config = EditConfig(model=model, image=image, prompt=prompt, mode=mode, mask=mask, box=box, dilate=dilate,
                            blend=blend, extend=extend, target=target, strength=strength, remask=remask,
                            resolution=resolution, cases=cases, out=out, name=name, sample=sampler)
        Console().print(summary_table(run_edit(config)))
