"""`meissonic synth`: write the synthetic LAION-style source (see `meissonic_cli.shapes.source`).

Its settings are `SynthConfig` (here, not in `shapes.source`: importing that module would load
http.server at every `meissonic` start); every field is a flag (`_options.py`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import typer

from meissonic_cli.config import Problems, field

from ._options import Group, Options, command, deprecated, extra_option

# synthetic.DEFAULT_SIDES spelled out (a test keeps them equal): importing synthetic here would load
# http.server at every `meissonic` start.
DEFAULT_SIDES = "96,128,192,256,320,512"


@dataclass
class SynthConfig:
    """Everything `meissonic synth` does; field help is the CLI help."""

    out: str = field("", help="Folder for images/ and metadata/ (parquet).", short="-o")
    rows: int = field(200, help="Rows of metadata (some repeat URLs, some answer 404).")
    schema: str = field("laion2b-en-aesthetic",
                        help="Column naming: laion2b-en-aesthetic, laion-aesthetics-v2, laion2b-en, lowercase.")
    files: int = field(1, help="Parquet files to split the metadata into.")
    sides: str = field(DEFAULT_SIDES, help="Image sides (pixels) of the served images, comma-separated (e.g. 64 or "
                                           "64,96,128); the shorter side of a non-square image is one of them.")
    seed: int = field(0, help="Seed: the same seed writes the same source.")
    base_url: str = field("http://127.0.0.1:8000", help="URL prefix of every image (where it will be served).")
    serve: bool = field(False, help="Serve the folder on 127.0.0.1 after writing it (until Ctrl-C); URLs use the "
                                    "server's port.")
    port: int = field(0, help="Port for --serve (0: any free port).")
    overwrite: bool = field(False, help="Replace images/ and metadata/ of an existing source (with --folder-images: "
                                        "the whole folder), once the new one is complete.")
    folder_images: Optional[int] = field(None, help="Instead write this many scene images with .txt captions (an image "
                                                    "folder for `tokenize`).")
    size: int = field(64, help="Image side for --folder-images.")

    def validate(self) -> "SynthConfig":
        p = Problems(self)
        p.check(bool(self.out), "--out is required (the folder to write the source to)")
        p.check(self.rows >= 1, f"--rows must be >= 1, got {self.rows}")
        p.check(1 <= self.files <= max(self.rows, 1), f"--files must be between 1 and --rows ({self.rows}), got {self.files}")
        p.check(0 <= self.port <= 65535, f"--port must be between 0 (any free port) and 65535, got {self.port}")
        p.check(self.folder_images is None or self.folder_images >= 1,
                f"--folder-images must be >= 1, got {self.folder_images}")
        p.check(0 <= self.seed < 2**63, f"--seed must be between 0 and {2**63 - 1}, got {self.seed}")
        p.raise_if_any()
        return self


def register(app: typer.Typer) -> None:
    # The folder used to be a positional argument: still accepted (hidden, deprecated) for one release.
    old_output = extra_option("output", Optional[str], typer.Argument(None, hidden=True, show_default=False))

    @command(app, "synth", [Group(SynthConfig, key="synth")], extra=[old_output], no_args_is_help=True)
    def synth_command(opts: Options, output: Optional[str] = None) -> None:
        """Write a synthetic LAION-style source: shapes-world images, dirty LAION-schema parquet, optional server."""
        given = opts.given("synth")
        if output is not None:
            deprecated("the OUT argument", "--out")
            given.setdefault("out", output)
        cfg = SynthConfig(**given).validate()
        from meissonic_cli.shapes.source import ImageServer, generate_source, parse_sides, write_image_folder

        if cfg.folder_images is not None:
            paths = write_image_folder(cfg.out, cfg.folder_images, size=cfg.size, seed=cfg.seed, overwrite=cfg.overwrite)
            typer.echo(f"wrote {len(paths)} images with captions to {cfg.out}")
            return
        side_list = parse_sides(cfg.sides)
        server = ImageServer(cfg.out, port=cfg.port).start() if cfg.serve else None
        try:
            source = generate_source(cfg.out, rows=cfg.rows, schema=cfg.schema, seed=cfg.seed, files=cfg.files,
                                     overwrite=cfg.overwrite, base_url=server.url if server else cfg.base_url,
                                     sides=side_list)
            typer.echo(f"wrote {source.images} images and {source.rows} metadata rows "
                       f"({', '.join(str(p) for p in source.parquet_files)}), URLs under {source.base_url}")
            if server is not None:
                typer.echo(f"serving {cfg.out} at {server.url}; Ctrl-C to stop")
                try:
                    server.serve_forever()
                except KeyboardInterrupt:  # the normal way to stop serving, not a failure
                    typer.echo("stopped")
        finally:
            if server is not None:
                server.stop()
