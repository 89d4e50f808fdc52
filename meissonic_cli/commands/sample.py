"""`meissonic sample`: prompts -> images with a released-layout model (see `meissonic_cli.sample.sample`).

Every `SampleConfig` field is a flag (`_options.py`); the decoding settings are the sampler group
that `edit` and `eval` share (`sampler_group`).
"""

from __future__ import annotations

from typing import Sequence

import typer

from meissonic_cli.sample.sample import SampleConfig

from ._options import Group, Options, command
from ._report import JSON_OPTION, report

# SampleConfig fields that describe one `sample` job rather than how the sampler decodes: every other
# field (steps, guidance, temperatures, seed, device, dtype, resolution, ...) is a sampler option.
JOB_FIELDS = ("model", "prompt", "prompts", "prompts_format", "images_per_prompt", "out", "batch_size", "grid",
              "allow_download", "overwrite")
SAMPLER_PANEL = "Sampler"


def sampler_group(exclude: Sequence[str] = (), panel: str = SAMPLER_PANEL) -> Group:
    """The sampler options (one declaration, one set of defaults) for sample, edit and eval: every
    SampleConfig field but the job fields (and `exclude`), so a new sampler setting reaches all three."""
    return Group(SampleConfig, key="sampler", exclude=tuple(JOB_FIELDS) + tuple(exclude), panel=panel)


def register(app: typer.Typer) -> None:
    groups = [Group(SampleConfig, key="job", only=JOB_FIELDS), sampler_group()]

    @command(app, "sample", groups, extra=[JSON_OPTION], no_args_is_help=True)
    def sample_command(opts: Options, json_out: bool = False) -> None:
        """Generate images from text prompts: one PNG + JSON sidecar per image in --out.

        Reruns skip images already written; with --grid a grid.png with the prompts is added.
        """
        from meissonic_cli.sample.sample import run_sample, summary_table

        cfg = SampleConfig(**opts.given("job"), **opts.given("sampler"))
        with report(json_out) as out:
            result = run_sample(cfg)
            out.show(summary_table(result))
            out.data = {**vars(result), "seconds_per_image": result.seconds_per_image}
