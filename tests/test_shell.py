"""The CLI as a shell citizen: prompts from stdin / FIFOs / process substitution, --images-per-prompt,
--json on every command that ends with a summary (one document on stdout, people's output on stderr),
and shell completion."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from typer.testing import CliRunner

from meissonic_cli.cli import app

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--steps", "2", "--resolution", "32", "--device", "cpu"]


def _invoke(args: list[str], **kwargs):
    return CliRunner().invoke(app, args, env={"COLUMNS": "200"}, **kwargs)


def _json_of(res) -> dict:
    """The --json document: stdout holds it and nothing else; people's output went to stderr."""
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


def _sidecars(out: Path) -> list[dict]:
    return [json.loads(p.read_text(encoding="utf-8")) for p in sorted(out.glob("*.json"))]


def test_prompts_from_stdin_with_images_per_prompt_and_json(tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    res = _invoke(["sample", "-m", str(tiny_model_dir), "--prompts", "-", "-o", str(out), "--images-per-prompt", "3",
                   "--seed", "10", "--json", *FAST], input="a red circle\n# skipped\nTwo blue squares\n")
    doc = _json_of(res)
    names = [Path(p).name for p in doc["written"]]
    assert names == [f"0000{i}-a-red-circle.png" for i in range(3)] + [f"0000{i}-two-blue-squares.png" for i in range(3, 6)]
    assert doc["skipped"] == 0 and doc["resolution"] == [32, 32] and doc["out_dir"] == str(out)
    assert "images written" in res.stderr and "images written" not in res.stdout
    metas = _sidecars(out)
    assert [m["seed"] for m in metas] == list(range(10, 16))  # seeds differ, names stable: prompt p -> p*3 .. p*3+2
    assert [m["prompt"] for m in metas] == ["a red circle"] * 3 + ["Two blue squares"] * 3
    images = [np.asarray(Image.open(out / n)) for n in names[:3]]
    assert not np.array_equal(images[0], images[1])  # another seed, another image
    # A rerun from the same stdin skips all six; a jsonl line's seed counts up per image.
    again = _json_of(_invoke(["sample", "-m", str(tiny_model_dir), "--prompts", "-", "-o", str(out),
                              "--images-per-prompt", "3", "--seed", "10", "--json", *FAST],
                             input="a red circle\n# skipped\nTwo blue squares\n"))
    assert again["written"] == [] and again["skipped"] == 6
    jl = tmp_path / "jl"
    _json_of(_invoke(["sample", "-m", str(tiny_model_dir), "--prompts", "-", "--prompts-format", "jsonl", "-o", str(jl),
                      "--images-per-prompt", "2", "--json", *FAST], input='{"prompt": "x", "seed": 40}\n'))
    assert [m["seed"] for m in _sidecars(jl)] == [40, 41]


def test_prompts_from_a_fifo(tiny_model_dir: Path, tmp_path: Path) -> None:
    fifo = tmp_path / "prompts"  # no extension: --prompts-format says what it holds
    os.mkfifo(fifo)

    def feed() -> None:
        with open(fifo, "w", encoding="utf-8") as f:
            f.write('{"prompt": "from a fifo", "seed": 3}\n')

    writer = threading.Thread(target=feed)
    writer.start()
    res = _invoke(["sample", "-m", str(tiny_model_dir), "--prompts", str(fifo), "--prompts-format", "jsonl",
                   "-o", str(tmp_path / "out"), *FAST])
    writer.join(timeout=30)
    assert res.exit_code == 0, res.output
    assert [(m["prompt"], m["seed"]) for m in _sidecars(tmp_path / "out")] == [("from a fifo", 3)]


def test_prompt_file_errors_name_the_flag(tiny_model_dir: Path, tmp_path: Path) -> None:
    for args, message in [
        (["--prompts", str(tmp_path / "missing.txt")], "no such file"),
        (["--prompts", str(tmp_path)], "is a folder"),
        (["--prompts", str(tmp_path / "p.csv")], "--prompts-format"),
        (["--prompts", "-", "--prompts-format", "yaml"], "--prompts-format must be txt or jsonl"),
        (["--prompts", "-", "--images-per-prompt", "0"], "--images-per-prompt must be between 1"),
    ]:
        (tmp_path / "p.csv").write_text("a\n")
        res = _invoke(["sample", "-m", str(tiny_model_dir), *args, "-o", str(tmp_path / "o"), *FAST], input="a\n")
        assert res.exit_code == 1 and message in res.output and "Traceback" not in res.output, (args, res.output)
    res = _invoke(["sample", "-m", str(tiny_model_dir), "--prompts", "-", "-o", str(tmp_path / "o"), *FAST],
                  input=b"\xff\xfe not utf-8\n")
    assert res.exit_code == 1 and "not UTF-8 text" in res.output
    assert not (tmp_path / "o").exists()


def _read_end_with(data: bytes) -> int:
    """The read end of a pipe holding `data` (what a shell hands a command for `<(...)` or a pipe)."""
    read, write = os.pipe()
    os.write(write, data)
    os.close(write)
    return read


def test_dev_fd_and_dev_stdin_paths(tiny_model_dir: Path, tmp_path: Path) -> None:
    """`<(...)` is a /dev/fd/N path and /dev/stdin the process's fd 0: both are read like files."""
    read = _read_end_with(b"one\ntwo\n")
    try:
        res = _invoke(["sample", "-m", str(tiny_model_dir), "--prompts", f"/dev/fd/{read}", "-o", str(tmp_path / "b"),
                       "--images-per-prompt", "2", *FAST])
    finally:
        os.close(read)
    assert res.exit_code == 0, res.output
    assert [m["prompt"] for m in _sidecars(tmp_path / "b")] == ["one", "one", "two", "two"]
    read, saved = _read_end_with(b'{"prompt": "three"}\n'), os.dup(0)
    try:
        os.dup2(read, 0)
        res = _invoke(["sample", "-m", str(tiny_model_dir), "--prompts", "/dev/stdin", "--prompts-format", "jsonl",
                       "-o", str(tmp_path / "c"), *FAST])
    finally:
        os.dup2(saved, 0)
        os.close(saved)
        os.close(read)
    assert res.exit_code == 0, res.output
    assert [m["prompt"] for m in _sidecars(tmp_path / "c")] == ["three"]


@pytest.mark.slow  # a fresh process (torch start-up)
def test_real_shell_process_substitution_and_json_pipe(tiny_model_dir: Path, tmp_path: Path) -> None:
    """In a real shell: `--prompts <(...)`, and stdout carries only the JSON (file descriptor 1 is
    routed, so child processes' output would go to stderr too)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "120"}
    script = (
        f"set -euo pipefail\n"
        f"{sys.executable} -m meissonic_cli sample --prompts <(printf 'a red circle\\n') -m {tiny_model_dir} "
        f"-o {tmp_path}/a {' '.join(FAST)} --json "
        f"| {sys.executable} -c 'import json,sys; d=json.load(sys.stdin); print(len(d[\"written\"]))'\n"
    )
    run = subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip() == "1" and "images written" in run.stderr
    assert [m["prompt"] for m in _sidecars(tmp_path / "a")] == ["a red circle"]


def test_edit_cases_from_stdin_and_json(tiny_model_dir: Path, tmp_path: Path) -> None:
    image = tmp_path / "in.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(image)
    case = json.dumps({"image": str(image), "prompt": "a cat\u2028on two lines", "box": "0,0,16,16", "name": "one"})
    res = _invoke(["edit", "-m", str(tiny_model_dir), "--cases", "-", "-o", str(tmp_path / "out"), "--steps", "2",
                   "--device", "cpu", "--json"], input="\ufeff" + case + "\n")
    doc = _json_of(res)
    assert [Path(p).name for p in doc["written"]] == ["one.png"] and doc["skipped"] == 0
    assert json.loads((tmp_path / "out" / "one.json").read_text())["prompt"] == "a cat\u2028on two lines"


def test_info_eval_json(tiny_model_dir: Path, tmp_path: Path) -> None:
    doc = _json_of(_invoke(["info", "-m", str(tiny_model_dir), "--json"]))
    assert doc["parameters"]["total"] > 0 and doc["layout"]["vqvae"] is True and doc["config"]["num_layers"] >= 1
    from meissonic_cli.shapes import world as shapes

    images = tmp_path / "images"
    images.mkdir()
    for i, p in enumerate(shapes.benchmark_prompts()[:2]):
        shapes.render(p.scene, 64).save(images / f"{i}.png")
        (images / f"{i}.json").write_text(json.dumps({"prompt": p.text, "file": f"{i}.png", "seed": i}))
    doc = _json_of(_invoke(["eval", "--suite", "shapes", "--images", str(images), "--out", str(tmp_path / "r"), "--json"]))
    assert doc["count"] == 2 and doc["shapes"]["overall"] == 1.0 and doc["report_json"] == str(tmp_path / "r" / "report.json")


def test_json_document_to_a_closed_stdout_is_one_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """With file descriptor 1 closed (`>&-`) Python's sys.stdout is None: the document cannot be written, and
    that is one plain error; a command that already failed keeps its own error."""
    from meissonic_cli.commands._report import report
    from meissonic_cli.errors import InputError, MeissonicError

    monkeypatch.setattr(sys, "stdout", None)
    with pytest.raises(MeissonicError, match=r"^cannot write the JSON document to standard output "
                                             r"\(standard output is closed\)$"):
        with report(True) as out:
            out.data = {"count": 1}
    with pytest.raises(InputError, match="^the command's own error$"):
        with report(True) as out:
            out.data = {"partial": True}
            raise InputError("the command's own error")


@pytest.mark.slow  # a fresh process (torch start-up)
def test_real_shell_json_with_stdout_closed(tmp_path: Path) -> None:
    from meissonic_cli.shapes import world as shapes

    images = tmp_path / "images"
    images.mkdir()
    p = shapes.benchmark_prompts()[0]
    shapes.render(p.scene, 64).save(images / "0.png")
    (images / "0.json").write_text(json.dumps({"prompt": p.text}))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "120"}
    script = f"{sys.executable} -m meissonic_cli eval --images {images} -o {tmp_path}/r -s shapes --json >&-"
    run = subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=env, timeout=600)
    errors = [line for line in run.stderr.splitlines() if line.startswith("Error:")]
    assert run.returncode == 1 and errors == [
        "Error: cannot write the JSON document to standard output (standard output is closed)"], run.stderr[-3000:]
    assert "Traceback" not in run.stderr


def test_curate_and_tokenize_json(tiny_model_dir: Path, tmp_path: Path) -> None:
    from meissonic_cli.shapes.source import synthetic_table

    src = tmp_path / "src"
    src.mkdir()
    pq.write_table(synthetic_table(60, schema="laion2b-en", seed=1), src / "part-00000.parquet")
    doc = _json_of(_invoke(["curate", str(src), "-o", str(tmp_path / "cur"), "--json"]))
    assert doc["stats"]["rows_in"] == 60 and doc["output"] == str(tmp_path / "cur")
    assert sum(pq.read_metadata(p).num_rows for p in doc["shards"]) == doc["stats"]["rows_out"]
    dry = _json_of(_invoke(["curate", str(src), "--dry-run", "--json"]))
    assert "SELECT" in dry["sql"].upper() and dry["shards"] == []

    images = tmp_path / "imgs"
    images.mkdir()
    for i in range(2):
        Image.fromarray(np.full((32, 32, 3), 40 * i, dtype=np.uint8)).save(images / f"{i}.png")
        (images / f"{i}.txt").write_text(f"caption {i}\n")
    doc = _json_of(_invoke(["tokenize", str(images), "--out", str(tmp_path / "tok"), "--model", str(tiny_model_dir),
                            "--resolution", "32", "--device", "cpu", "--json"]))
    assert doc["images"] == 2 and doc["shards_written"] >= 1 and doc["out_dir"] == str(tmp_path / "tok")


@pytest.mark.slow  # img2dataset's worker start-up: ~30 s on a busy 2-core machine
def test_download_json(tmp_path: Path) -> None:
    from meissonic_cli.shapes.source import ImageServer, generate_source

    with ImageServer(tmp_path / "source") as server:
        source = generate_source(tmp_path / "source", rows=6, base_url=server.url, seed=3)
        res = _invoke(["download", str(source.parquet_files[0]), "-o", str(tmp_path / "dl"), "--image-size", "32",
                       "--processes", "1", "--threads", "2", "--timeout", "5", "--json"])
    doc = _json_of(res)
    assert doc["complete"] is True and doc["output"] == str(tmp_path / "dl") and doc["count"] >= 1
    assert doc["successes"] == sum(json.loads(p.read_text())["successes"] for p in (tmp_path / "dl").glob("*_stats.json"))


def test_json_errors_keep_the_exit_code_and_leave_stdout_empty(tmp_path: Path) -> None:
    res = _invoke(["info", "--arch", "nope", "--json"])
    assert res.exit_code == 1 and res.stdout == "" and "Error: unknown --arch" in res.stderr


def test_shell_completion_is_on() -> None:
    shown = CliRunner().invoke(app, ["--show-completion", "bash"], env={"COLUMNS": "200"}, prog_name="meissonic")
    assert shown.exit_code == 0, (shown.output, repr(shown.exception))
    assert "_MEISSONIC_COMPLETE" in shown.stdout.upper().replace("-", "_")
    env = {"_MEISSONIC_COMPLETE": "complete_bash", "COMP_WORDS": "meissonic sam", "COMP_CWORD": "1"}
    res = CliRunner().invoke(app, [], env=env, prog_name="meissonic")
    assert "sample" in res.stdout.split()
    env = {"_MEISSONIC_COMPLETE": "complete_bash", "COMP_WORDS": "meissonic sample --images-per", "COMP_CWORD": "2"}
    res = CliRunner().invoke(app, [], env=env, prog_name="meissonic")
    assert "--images-per-prompt" in res.stdout.split()
