"""`meissonic eval`: CLIP-T/CLIP-I, HPS v2/v2.1, DINO, FID and the shapes benchmark (see `meissonic_cli.metrics.evaluate`).

Flags: every `EvalConfig` field, then the sampler options shared with `sample` and `edit` (used with
--prompts). One --device serves the metric networks and the sampler.
"""

from __future__ import annotations

import typer

from meissonic_cli.metrics.evaluate import EvalConfig
from meissonic_cli.sample.sample import SampleConfig

from ._options import Group, Options, command
from ._report import JSON_OPTION, report
from .sample import sampler_group

PANEL = "Sampler (with --prompts)"


def register(app: typer.Typer) -> None:
    groups = [
        Group(EvalConfig, key="eval"),
        Group(SampleConfig, key="sample_batch", only=("batch_size",), flags={"batch_size": "--sample-batch-size"},
              panel=PANEL),
        sampler_group(exclude=("device",), panel=PANEL),
    ]

    @command(app, "eval", groups, extra=[JSON_OPTION], no_args_is_help=True)
    def eval_command(opts: Options, json_out: bool = False) -> None:
        """Score images with the paper's metrics (weights from local files) or the weight-free shapes benchmark.

        Scores a folder from `sample`/`edit` (--images), or samples a prompt file first (--prompts, --model).
        Writes report.json, report.md and grid.png to --out.
        """
        import meissonic_cli.shapes.bench  # noqa: F401  (registers the shapes suite)
        from meissonic_cli.metrics.evaluate import parse_suites, report_table, run_eval

        given = opts.given("eval")
        if "suites" in given:  # --suite clip,fid and --suite clip --suite fid alike
            given["suites"] = parse_suites(",".join(given["suites"]))
        config = EvalConfig(**given)
        config.sample = SampleConfig(device=config.device, **opts.given("sample_batch"), **opts.given("sampler"))
        with report(json_out) as out:
            result = run_eval(config)
            out_dir = config.out_dir
            out.data = {**result, "report_json": out_dir / "report.json", "report_md": out_dir / "report.md"}
            out.show(report_table(result))
            for line in result.get("warnings", []):  # what makes a number here not comparable with a published one
                typer.echo(f"Warning: {line}", err=True)
            if "shapes" in result:
                from meissonic_cli.shapes.bench import print_report

                print_report(result["shapes"], out.console)
            out.show(f"report: {out_dir / 'report.json'}, {out_dir / 'report.md'}"
                     + (f", grid {result['grid']}" if result.get("grid") else ""), highlight=False)
