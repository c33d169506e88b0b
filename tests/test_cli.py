"""Command lines fail like real tools (sga_jax.cli): for each command a bad path, a corrupt
safetensors file, a pickle with a forbidden global and a bad config value or argument give exit
status 2 and one `error:` line naming the file, key or field, without a traceback; --debug (or
SGA_JAX_DEBUG=1) adds the traceback; Ctrl-C exits 130; --help shows examples and defaults.

Commands run in-process through their `main(argv)` (the same code path as `python -m`); a few
subprocesses prove the exit status and stderr of the real process. `data` and `geometry` read no
weights, so they have no corrupt-file or pickle case.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sga_jax import cli
from sga_jax.convert import main as convert_main
from sga_jax.data.__main__ import main as data_main
from sga_jax.encode.__main__ import main as encode_main
from sga_jax.errors import CheckpointError, ConfigError
from sga_jax.evaluate.__main__ import main as evaluate_main
from sga_jax.geometry.__main__ import main as geometry_main
from sga_jax.plan.__main__ import main as plan_main
from sga_jax.sample.__main__ import main as sample_main
from sga_jax.train.__main__ import main as train_main
from sga_jax.train.export.__main__ import main as export_main

ROOT = Path(__file__).resolve().parent.parent
REFUSED = "refused to unpickle the global posix.system"


class Forbidden:
    """Unpickles as a call to os.system: what a safe reader must refuse by name."""

    def __reduce__(self):
        return os.system, ("echo pickles run code",)


@pytest.fixture(scope="module")
def demo_assets(tmp_path_factory):
    from sga_jax.demo import prepare_demo_assets

    return prepare_demo_assets(tmp_path_factory.mktemp("assets"))


@pytest.fixture(scope="module")
def files(tmp_path_factory, demo_assets):
    """A corrupt and a truncated safetensors file, a torch.save pickle with a forbidden global and a
    save_pretrained folder (CLIP text config) whose pytorch_model.bin has one, a dataset of one
    image, an empty folder."""
    root = tmp_path_factory.mktemp("cli")
    (root / "corrupt.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    from safetensors.numpy import save_file

    save_file({"w": np.ones((64, 64), np.float32)}, str(root / "whole.safetensors"))
    (root / "truncated.safetensors").write_bytes((root / "whole.safetensors").read_bytes()[:-100])
    torch.save({"state_dict": {"weight": Forbidden()}}, root / "model.pt")
    pickled = root / "pickled_model"
    pickled.mkdir()
    shutil.copy(demo_assets["text"] / "text_encoder" / "config.json", pickled / "config.json")
    torch.save({"weight": Forbidden()}, pickled / "pytorch_model.bin")
    data = root / "data"
    data.mkdir()
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(data / "a.png")
    (data / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "text": "a black square"}) + "\n")
    (root / "empty").mkdir()
    return root


@pytest.fixture(autouse=True)
def sga_jax_logger():
    """Commands send sga_jax's log to stderr (cli.log_to_stderr); undo that for the next tests."""
    logger = logging.getLogger("sga_jax")
    saved = (list(logger.handlers), logger.level, logger.propagate)
    yield
    logger.handlers[:], logger.level, logger.propagate = saved


def one_error(capsys, status: int, *fragments: str) -> str:
    """Assert exit status 2 and exactly one `error:` line holding every fragment, no traceback."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert status == 2, err[-3000:]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    for fragment in fragments:
        assert fragment in err, (fragment, err[-3000:])
    return lines[0]


# ----------------------------------------------------------------------------- the helper itself


def test_error_message_is_one_line_plus_indented_detail():
    error = CheckpointError("ckpt/flux: 3 missing tensors\nimg_in.weight\nimg_in.bias\n\n  txt_in.weight")
    assert cli.error_message(error) == "error: ckpt/flux: 3 missing tensors\n  img_in.weight\n  img_in.bias\n  txt_in.weight"
    many = cli.error_message(CheckpointError("head\n" + "\n".join(f"key{i}" for i in range(30))))
    assert many.splitlines()[-1] == "  ... (18 more lines; --debug shows all)" and len(many.splitlines()) == 14
    assert cli.error_message(FileNotFoundError(2, "No such file or directory", "/x/y")) == \
        "error: /x/y: No such file or directory"


def test_run_maps_how_a_command_ends_to_its_exit_status(capsys, monkeypatch):
    def fail(args):
        raise ConfigError("config.align.block=30: Flux has 19 double blocks")

    assert cli.run(fail, []) == 2
    assert capsys.readouterr().err == "error: config.align.block=30: Flux has 19 double blocks\n"
    assert cli.run(fail, ["--debug"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("Traceback (most recent call last)") and err.endswith("error: config.align.block=30: "
                                                                                "Flux has 19 double blocks\n")
    monkeypatch.setenv("SGA_JAX_DEBUG", "1")
    assert cli.run(fail, []) == 2 and "Traceback" in capsys.readouterr().err
    monkeypatch.setenv("SGA_JAX_DEBUG", "0")
    assert cli.run(lambda args: None, []) == 0 and cli.run(lambda args: 3, []) == 3
    with pytest.raises(ZeroDivisionError):  # a bug keeps its traceback
        cli.run(lambda args: 1 / 0, [])

    def interrupted(args):
        raise KeyboardInterrupt

    assert cli.run(interrupted, []) == 130
    assert capsys.readouterr().err == "interrupted\n"


# ----------------------------------------------------------------------------- each command


def test_train(files, demo_assets, capsys, monkeypatch):
    monkeypatch.setenv("SGA_DEMO_ASSETS", str(demo_assets["data"].parent))
    base = ["--config", str(ROOT / "configs" / "demo.py"), "--dry_run", "--config.batch_size=8"]  # 8 devices
    one_error(capsys, train_main([*base, "--config.model.flux.weights=/nope/flux1-dev.safetensors"]),
              "/nope/flux1-dev.safetensors")
    one_error(capsys, train_main([*base, f"--config.model.flux.weights={files / 'corrupt.safetensors'}"]),
              f"{files / 'corrupt.safetensors'}: not a readable safetensors file")
    one_error(capsys, train_main([*base, f"--config.model.vae.weights={files / 'model.pt'}"]),
              f"{files / 'model.pt'}: {REFUSED}")
    one_error(capsys, train_main([*base, "--config.align.method=bogus"]), "config.align.method='bogus'")
    one_error(capsys, train_main([*base, "--config.align.nope=1"]), "field the config does not have: 'nope'")
    one_error(capsys, train_main([*base, "--config.total_steps=many"]), "--config.total_steps=many")
    one_error(capsys, train_main(["--config", str(files / "missing.py")]), "cannot load the config file",
              "missing.py")
    one_error(capsys, train_main(["--dry_run"]), "Flag --config must have a value other than None")
    assert train_main([*base, f"--config.model.flux.weights={files / 'truncated.safetensors'}", "--debug"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.splitlines()[-1].startswith(f"error: {files / 'truncated.safetensors'}")


def test_train_export(files, demo_assets, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("SGA_DEMO_ASSETS", str(demo_assets["data"].parent))
    from configs.demo import get_config

    def workdir(name: str, **weights: str) -> Path:
        config = get_config()
        for part, path in weights.items():
            config.model[part].weights = path
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(config.to_dict()))
        return tmp_path / name

    out = ["--out", str(tmp_path / "out")]
    one_error(capsys, export_main(["--workdir", "/nope/run", *out]), "/nope/run/config.json not found")
    one_error(capsys, export_main(["--workdir", str(workdir("corrupt", flux=str(files / "corrupt.safetensors"))), *out]),
              "corrupt.safetensors: not a readable safetensors file")
    one_error(capsys, export_main(["--workdir", str(workdir("pickle", vae=str(files / "model.pt"))), *out]),
              f"model.pt: {REFUSED}")
    one_error(capsys, export_main(["--workdir", str(workdir("plain")), *out, "--format", "onnx"]),
              "--format 'onnx': task 'flux_sga' exports ('diffusers', 'bfl')")
    one_error(capsys, export_main(["--workdir", str(workdir("steps")), *out, "--step", "ten"]),
              "argument --step: invalid int value: 'ten'")


def test_convert(files, capsys):
    out = str(files / "converted")
    one_error(capsys, convert_main(["flux", "/nope/flux1-dev.safetensors", out]), "/nope/flux1-dev.safetensors")
    one_error(capsys, convert_main(["vae", str(files / "corrupt.safetensors"), out]),
              f"{files / 'corrupt.safetensors'}: not a readable safetensors file")
    one_error(capsys, convert_main(["flux", str(files / "truncated.safetensors"), out]), "truncated.safetensors")
    one_error(capsys, convert_main(["vae", str(files / "model.pt"), out]), f"model.pt: {REFUSED}")
    one_error(capsys, convert_main(["clip", str(files / "pickled_model"), out]), f"pytorch_model.bin: {REFUSED}")
    one_error(capsys, convert_main(["dinov2", str(files / "empty"), out]),
              "empty: holds no save_pretrained model")
    one_error(capsys, convert_main(["sdxl", str(files / "empty"), out]), "argument family: invalid choice: 'sdxl'")


def test_sample(files, capsys):
    out = ["--out", str(files / "samples"), "--prompt", "a cat"]
    one_error(capsys, sample_main(["--root", "/nope/FLUX.1-dev", *out]), "/nope/FLUX.1-dev: no such folder")
    root = ["--root", str(files / "empty")]
    one_error(capsys, sample_main([*root, "--transformer", str(files / "corrupt.safetensors"), *out]),
              "corrupt.safetensors: not a readable safetensors file")
    one_error(capsys, sample_main([*root, "--transformer", str(files / "model.pt"), *out]), f"model.pt: {REFUSED}")
    one_error(capsys, sample_main([*root, "--height", "tall", *out]), "argument --height: invalid int value: 'tall'")
    one_error(capsys, sample_main([*root, "--out", str(files / "samples")]), "give at least one --prompt")


def test_evaluate(files, capsys):
    images = ["--images", str(files / "data")]
    one_error(capsys, evaluate_main(["--images", "/nope/samples"]), "/nope/samples is not a directory of images")
    one_error(capsys, evaluate_main([*images, "--vae", str(files / "corrupt.safetensors")]),
              "corrupt.safetensors: not a readable safetensors file")
    one_error(capsys, evaluate_main([*images, "--inception", str(files / "model.pt")]), f"model.pt: {REFUSED}")
    one_error(capsys, evaluate_main([*images, "--fid_protocol", "tf2"]), "argument --fid_protocol: invalid choice")
    one_error(capsys, evaluate_main([*images, "--lpips_lin", "vgg.pth"]), "--lpips_lin needs --lpips_vgg")


def test_encode(files, demo_assets, capsys, tmp_path):
    config_file = tmp_path / "encode_config.py"
    config_file.write_text(textwrap.dedent(f"""
        import ml_collections
        from sga_jax.data import default_data_config
        from sga_jax.text import default_text_config

        def get_config():
            data = default_data_config()
            data.path = {str(files / 'data')!r}
            data.caption_cache = {str(tmp_path / 'cache')!r}
            text = default_text_config()
            text.root = {str(demo_assets['text'])!r}
            text.dtype = "float32"
            return ml_collections.ConfigDict({{"data": data, "text": text}})
    """))
    base = ["--config", str(config_file)]
    one_error(capsys, encode_main([*base, "--config.data.path=/nope/images"]), "/nope/images is not a directory")
    one_error(capsys, encode_main([*base, f"--config.text.t5={files / 'corrupt.safetensors'}"]),
              f"{files / 'corrupt.safetensors'}: not a readable safetensors file")
    one_error(capsys, encode_main([*base, f"--config.text.clip={files / 'pickled_model'}"]),
              f"pytorch_model.bin: {REFUSED}")
    one_error(capsys, encode_main([*base, "--config.data.caption_cache="]), "config.data.caption_cache is empty")
    one_error(capsys, encode_main(base + ["extra"]), "expected no positional arguments, got ['extra']")


def test_data(files, capsys):
    one_error(capsys, data_main(["/nope/images"]), "dataset path /nope/images is not a directory")
    one_error(capsys, data_main([str(files / "data"), "--data.buckets.fixed=wide"]),
              "data.buckets.fixed must look like '1024x768', got 'wide'")
    one_error(capsys, data_main([str(files / "data"), "--data.nope=1"]), "field the config does not have: 'nope'")
    one_error(capsys, data_main([]), "expected DATASET, got []")
    assert data_main([str(files / "data"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["readable"] == 1


def test_geometry(files, capsys):
    (files / "a_file").write_text("")
    one_error(capsys, geometry_main(["--out", str(files / "a_file" / "report"), "--grid", "3", "--channels", "6",
                                     "--steps", "1", "--pairs", "2"]), f"{files / 'a_file'}")
    one_error(capsys, geometry_main(["--out", str(files / "geo"), "--channels", "7"]), "even --channels >= 6, got 16 and 7")
    one_error(capsys, geometry_main(["--out", str(files / "geo"), "--grid", "x"]), "argument --grid: invalid int value")


# ----------------------------------------------------------------------------- --help


@pytest.mark.parametrize("main, command", [
    (train_main, "sga_jax.train"), (export_main, "sga_jax.train.export"), (convert_main, "sga_jax.convert"),
    (sample_main, "sga_jax.sample"), (evaluate_main, "sga_jax.evaluate"), (encode_main, "sga_jax.encode"), (data_main, "sga_jax.data"),
    (geometry_main, "sga_jax.geometry"), (plan_main, "sga_jax.plan"),
])
def test_help_shows_examples_and_every_default(main, command, capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    examples = out[out.index("Examples:"):]
    assert sum(line.startswith(f"  python -m {command} ") for line in examples.splitlines()) >= 2, out
    assert "debug" in out and "default: " in out
    if command in ("sga_jax.train", "sga_jax.encode", "sga_jax.data", "sga_jax.plan"):
        return  # absl prints "(default: ...)" under every flag itself
    parser = sys.modules[main.__module__].parser()
    formatter = parser._get_formatter()
    for action in parser._actions:
        if action.option_strings and not action.required and action.dest != "help":
            assert "default" in formatter._get_help_string(action), (command, action.option_strings)


# ----------------------------------------------------------------------------- real processes


def _python(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT, timeout=300,
                          env={**os.environ, **env})


def test_processes_exit_2_with_one_line_and_show_the_traceback_with_debug(files):
    corrupt = str(files / "corrupt.safetensors")
    plain = _python("-m", "sga_jax.convert", "flux", corrupt, str(files / "x"))
    assert plain.returncode == 2
    assert plain.stderr.startswith(f"error: {corrupt}: not a readable safetensors file")
    assert plain.stderr.count("\n") == 1, plain.stderr
    debug = _python("-m", "sga_jax.convert", "flux", corrupt, str(files / "x"), SGA_JAX_DEBUG="1")
    assert debug.returncode == 2 and "Traceback (most recent call last)" in debug.stderr
    assert debug.stderr.splitlines()[-1] == plain.stderr.strip()
    usage = _python("-m", "sga_jax.train", "--config", "configs/toy.py", "--dry_run", "--config.nope=1")
    assert usage.returncode == 2 and usage.stderr.strip().splitlines()[-1] == \
        "error: a config override names a field the config does not have: 'nope'"


def test_ctrl_c_exits_130_without_a_traceback():
    # Python's own Ctrl-C handler, as in a terminal: a suite started in the background (`pytest &`)
    # hands its children SIGINT ignored, and Python keeps an ignored SIGINT ignored.
    script = "import signal, sys, time; from sga_jax import cli\n" \
             "signal.signal(signal.SIGINT, signal.default_int_handler)\n" \
             "sys.exit(cli.run(lambda args: (print('ready', flush=True), time.sleep(120)), []))"
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130 and err == "interrupted\n"
