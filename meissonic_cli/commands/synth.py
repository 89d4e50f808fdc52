"""`meissonic synth`: write the synthetic LAION-style source (see `meissonic_cli.shapes.source`)."""

from __future__ import annotations

from typing import Optional

import typer

from ._common import handle_errors

# synthetic.DEFAULT_SIDES spelled out (a test keeps them equal): importing synthetic here would load
# http.server at every `meissonic` start.
DEFAULT_SIDES = "96,128,192,256,320,512"


def register(app: typer.Typer) -> None:
    @app.command("synth", no_args_is_help=True)
    @handle_errors
    def synth_command(
        output: str = typer.Argument(..., help="Folder for images/ and metadata/ (parquet).", show_default=False),
        rows: int = typer.Option(200, help="Rows of metadata (some repeat URLs, some answer 404)."),
        schema: str = typer.Option("laion2b-en-aesthetic",
                                   help="Column naming: laion2b-en-aesthetic, laion-aesthetics-v2, laion2b-en, lowercase."),
        files: int = typer.Option(1, help="Parquet files to split the metadata into."),
        sides: str = typer.Option(DEFAULT_SIDES, help="Image sides (pixels) of the served images, comma-separated "
                                  "(e.g. 64 or 64,96,128); the shorter side of a non-square image is one of them."),
        seed: int = typer.Option(0, help="Seed: the same seed writes the same source."),
        base_url: str = typer.Option("http://127.0.0.1:8000", help="URL prefix of every image (where it will be served)."),
        serve: bool = typer.Option(False, "--serve", help="Serve the folder on 127.0.0.1 after writing it (until Ctrl-C); URLs use the server's port."),
        port: int = typer.Option(0, help="Port for --serve (0: any free port)."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace images/ and metadata/ of an existing source."),
        folder_images: Optional[int] = typer.Option(None, help="Instead write this many scene images with .txt captions (an image folder for `tokenize`)."),
        size: int = typer.Option(64, help="Image side for --folder-images."),
    ) -> None:
        """Write a synthetic LAION-style source: shapes-world images, dirty LAION-schema parquet, optional server."""
        from meissonic_cli.shapes.source import ImageServer, generate_source, parse_sides, write_image_folder

        if folder_images is not None:
            paths = write_image_folder(output, folder_images, size=size, seed=seed)
            typer.echo(f"wrote {len(paths)} images with captions to {output}")
            return
        side_list = parse_sides(sides)
        server = ImageServer(output, port=port).start() if serve else None
        try:
            source = generate_source(output, rows=rows, schema=schema, seed=seed, files=files, overwrite=overwrite,
                                     base_url=server.url if server else base_url, sides=side_list)
            typer.echo(f"wrote {source.images} images and {source.rows} metadata rows "
                       f"({', '.join(str(p) for p in source.parquet_files)}), URLs under {source.base_url}")
            if server is not None:
                typer.echo(f"serving {output} at {server.url}; Ctrl-C to stop")
                try:
                    server.serve_forever()
                except KeyboardInterrupt:  # the normal way to stop serving, not a failure
                    typer.echo("stopped")
        finally:
            if server is not None:
                server.stop()
