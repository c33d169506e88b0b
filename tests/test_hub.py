"""Hugging Face hub ids wherever weights go (sga_jax.weights.hub), offline: a hub cache laid out as
huggingface_hub lays it (tests/hub_cache.py, checked with huggingface_hub's own cache scanner)
resolves org/name for Flux, the VAE, a prior and the text encoders; training and conversion read
it value for value as the local folders; the online path is driven by a stand-in for the hub API
to show that only the chosen files are asked for; errors say what to do."""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import huggingface_hub
import jax
import numpy as np
import pytest
from flax import nnx
from huggingface_hub import constants, errors as hub_errors

from sga_jax.convert import main as convert_main
from sga_jax.errors import CheckpointError, HubError
from sga_jax.train import loop, state as state_lib
from sga_jax.train.task import get_task
from sga_jax.weights import converted, hub
from tests.hub_cache import write_hub_cache

ROOT = Path(__file__).resolve().parent.parent
FLUX_REPO, PRIOR_REPO = "sga-test/FLUX.1-tiny", "sga-test/dinov2-tiny"


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """An empty hub cache, and the hub switched off as HF_HUB_OFFLINE=1 does (huggingface_hub reads
    the environment at import, so the test sets what it read)."""
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    hub._fetch.cache_clear()
    yield cache
    hub._fetch.cache_clear()


def touch(folder: Path, *names: str) -> Path:
    for name in names:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(b"")
    return folder


FLUX_FOLDER_FILES = ("flux1-dev.safetensors", "ae.safetensors", "model_index.json", "scheduler/scheduler_config.json",
                     "transformer/config.json", "transformer/diffusion_pytorch_model.safetensors",
                     "vae/config.json", "vae/diffusion_pytorch_model.safetensors",
                     "text_encoder/config.json", "text_encoder/model.safetensors",
                     "text_encoder_2/config.json", "text_encoder_2/model.safetensors.index.json",
                     "text_encoder_2/model-00001-of-00002.safetensors", "text_encoder_2/model-00002-of-00002.safetensors",
                     "tokenizer/vocab.json", "tokenizer/merges.txt", "tokenizer_2/spiece.model",
                     "tokenizer_2/tokenizer.json")


def test_parse_tells_hub_ids_from_local_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ckpt" / "flux").mkdir(parents=True)
    assert hub.parse("black-forest-labs/FLUX.1-dev") == hub.HubId("black-forest-labs/FLUX.1-dev")
    assert hub.parse("facebook/dinov2-base@v1.0:sub/dir") == hub.HubId("facebook/dinov2-base", "v1.0", "sub/dir")
    assert str(hub.HubId("facebook/dinov2-base", "v1.0", "sub")) == "facebook/dinov2-base@v1.0:sub"
    assert hub.parse("ckpt/flux") is None  # an existing folder is local
    assert hub.parse("hf://ckpt/flux") == hub.HubId("ckpt/flux")
    for local in ("/abs/missing/x", "model.safetensors", "a/b/c", "./a/b", ""):
        assert hub.parse(local) is None, local
    with pytest.raises(HubError, match="not a hub id"):
        hub.parse("hf://not an id")


def test_layouts_choose_as_the_readers_do(tmp_path):
    root = touch(tmp_path / "root", *FLUX_FOLDER_FILES)
    assert hub.select_local(root, hub.FLUX) == root / "flux1-dev.safetensors"  # BFL's single file first
    assert hub.select_local(root, hub.VAE) == root / "ae.safetensors"
    diffusers = touch(tmp_path / "diffusers", *(f for f in FLUX_FOLDER_FILES if "/" in f))
    assert hub.select_local(diffusers, hub.FLUX) == diffusers / "transformer"
    assert hub.select_local(diffusers, hub.VAE) == diffusers / "vae"
    assert hub.select_local(diffusers / "transformer", hub.FLUX) == diffusers / "transformer"
    converted_dir = touch(tmp_path / "converted", "sga_config.json", "params/a/b")
    assert hub.select_local(converted_dir, hub.PRETRAINED) == converted_dir
    assert hub.select_local(tmp_path / "missing.safetensors", hub.FLUX) == tmp_path / "missing.safetensors"
    with pytest.raises(CheckpointError, match=r"empty: holds no Flux VAE \(looked for sga_config.json, ae.safetensors"):
        hub.select_local(touch(tmp_path / "empty", "notes.txt"), hub.VAE)
    pickles = touch(tmp_path / "pickles", "config.json", "pytorch_model.bin")  # read by the safe unpickler
    assert hub.select_local(pickles, hub.PRETRAINED) == pickles
    assert hub.select(["config.json", "model.safetensors", "pytorch_model.bin"], hub.PRETRAINED).files == \
        ("*.json", "*.safetensors")  # safetensors first: the pickles are not fetched
    assert hub.matches("a.json", "*.json") and not hub.matches("sub/a.json", "*.json")
    assert hub.matches("params/x/y/z", "params/**") and not hub.matches("paramsx", "params/**")


def test_offline_cache_resolves_flux_vae_prior_and_text(offline, tmp_path):
    snapshot = write_hub_cache(offline, FLUX_REPO, touch(tmp_path / "flux", *FLUX_FOLDER_FILES))
    prior = write_hub_cache(offline, PRIOR_REPO, touch(tmp_path / "prior", "config.json", "model.safetensors"))
    scan = huggingface_hub.scan_cache_dir(offline)
    assert not scan.warnings and {r.repo_id for r in scan.repos} == {FLUX_REPO, PRIOR_REPO}

    assert hub.resolve(FLUX_REPO, hub.FLUX) == snapshot / "flux1-dev.safetensors"
    assert hub.resolve(FLUX_REPO, hub.VAE) == snapshot / "ae.safetensors"
    assert hub.resolve(f"{FLUX_REPO}:transformer", hub.FLUX) == snapshot / "transformer"
    assert hub.resolve(f"{FLUX_REPO}@main:vae", hub.VAE) == snapshot / "vae"
    assert hub.resolve(f"{FLUX_REPO}:ae.safetensors", hub.FLUX) == snapshot / "ae.safetensors"  # :path names a file
    assert hub.resolve(PRIOR_REPO, hub.PRETRAINED) == prior
    assert hub.resolve_folder(FLUX_REPO, (hub.FLUX_TEXT, hub.FLUX, hub.VAE)) == snapshot
    assert converted.resolve_weights("dinov2", PRIOR_REPO) == prior

    with pytest.raises(HubError) as missing:
        hub.resolve("sga-test/missing", hub.PRETRAINED)
    message = str(missing.value)
    assert message.startswith("sga-test/missing: not a local path, and sga-test/missing is not in the Hugging Face cache")
    assert "HF_HUB_OFFLINE is set" in message and "hf download sga-test/missing" in message
    with pytest.raises(HubError, match="sga-test/dinov2-tiny@v9 is not in the Hugging Face cache"):
        hub.resolve(f"{PRIOR_REPO}@v9", hub.PRETRAINED)
    with pytest.raises(HubError, match="the cached copy of repo sga-test/dinov2-tiny holds no Flux.1 text encoders"):
        hub.resolve_folder(PRIOR_REPO, (hub.FLUX_TEXT,))
    with pytest.raises(HubError, match="cached copy of folder 'nothing' of repo sga-test/dinov2-tiny holds no Flux VAE"):
        hub.resolve(PRIOR_REPO + ":nothing", hub.VAE)


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    """The hub API answered locally: repo_info lists FLUX_FOLDER_FILES (plus a name with fnmatch
    brackets) at a fixed commit; snapshot_download records what it was asked for."""
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    hub._fetch.cache_clear()
    files = (*FLUX_FOLDER_FILES, "tokenizer/added[1].json")
    calls: dict[str, list] = {"info": [], "download": []}
    raise_on_info: list[Exception] = []

    def repo_info(self, repo_id, revision=None, **kwargs):
        calls["info"].append((repo_id, revision))
        if raise_on_info:
            raise raise_on_info[0]
        return types.SimpleNamespace(sha="c0ffee" * 6 + "abcd", siblings=[types.SimpleNamespace(rfilename=f) for f in files])

    def snapshot_download(repo_id, *, revision=None, allow_patterns=None, local_files_only=False, **kwargs):
        calls["download"].append({"repo": repo_id, "revision": revision, "allow_patterns": allow_patterns,
                                  "local_files_only": local_files_only})
        if local_files_only:
            raise hub_errors.LocalEntryNotFoundError("not cached")
        return str(touch(tmp_path / "snapshot", *files))

    monkeypatch.setattr(huggingface_hub.HfApi, "repo_info", repo_info)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    yield calls, raise_on_info
    hub._fetch.cache_clear()


def test_online_only_the_chosen_files_are_fetched_once(fake_hub, tmp_path):
    calls, _ = fake_hub
    assert hub.resolve("org/FLUX.1-dev", hub.FLUX) == tmp_path / "snapshot" / "flux1-dev.safetensors"
    assert calls["download"] == [{"repo": "org/FLUX.1-dev", "revision": "c0ffee" * 6 + "abcd",
                                  "allow_patterns": ["flux1-dev.safetensors"], "local_files_only": False}]
    hub.resolve("org/FLUX.1-dev", hub.FLUX)
    assert len(calls["info"]) == 1 and len(calls["download"]) == 1  # once per process

    folder = hub.resolve_folder("org/FLUX.1-dev@dev-branch", (hub.FLUX_TEXT, hub.VAE))
    assert folder == tmp_path / "snapshot" and calls["info"][-1] == ("org/FLUX.1-dev", "dev-branch")
    wanted = calls["download"][-1]["allow_patterns"]
    assert "ae.safetensors" in wanted and "text_encoder_2/model-00002-of-00002.safetensors" in wanted
    assert "tokenizer_2/spiece.model" in wanted and "tokenizer/added[[]1].json" in wanted  # escaped for fnmatch
    assert not any(name.startswith(("transformer/", "vae/", "scheduler/")) or name == "flux1-dev.safetensors"
                   for name in wanted)
    hub.resolve("org/FLUX.1-dev:transformer", hub.FLUX)
    assert calls["download"][-1]["allow_patterns"] == ["transformer/config.json",
                                                       "transformer/diffusion_pytorch_model.safetensors"]


def _hub_error(cls: type[Exception], message: str) -> Exception:
    error = cls.__new__(cls)  # the hub's HTTP errors need a response object; only the type matters here
    Exception.__init__(error, message)
    return error


def test_hub_errors_say_what_to_do(fake_hub):
    calls, raise_on_info = fake_hub
    raise_on_info.append(_hub_error(hub_errors.GatedRepoError, "403 gated"))
    with pytest.raises(HubError, match=r"org/gated is a gated model: accept its license at "
                                       r"https://huggingface.co/org/gated, then log in with `hf auth login`"):
        hub.resolve("org/gated", hub.PRETRAINED)
    raise_on_info[0] = _hub_error(hub_errors.RepositoryNotFoundError, "404")
    with pytest.raises(HubError, match="there is no Hugging Face repo org/typo you can read: check the id"):
        hub.resolve("org/typo", hub.PRETRAINED)
    raise_on_info[0] = _hub_error(hub_errors.RevisionNotFoundError, "404 revision")
    with pytest.raises(HubError, match="has no revision 'v2'"):
        hub.resolve("org/model@v2", hub.PRETRAINED)
    raise_on_info[0] = ConnectionError("network is unreachable")
    with pytest.raises(HubError, match=r"not in the Hugging Face cache .* while the hub cannot be reached "
                                       r"\(ConnectionError: network is unreachable\)"):
        hub.resolve("org/offline", hub.PRETRAINED)
    assert calls["download"][-1]["local_files_only"]  # a network failure falls back to the cache


def test_repo_lock_makes_sharing_processes_wait(tmp_path, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    order = []
    held = threading.Event()

    def first():
        with hub._repo_lock("org/name"):
            held.set()
            time.sleep(0.3)
            order.append("first done")

    thread = threading.Thread(target=first)
    thread.start()
    held.wait()
    with hub._repo_lock("org/name"):  # a separate open file description: flock blocks as across processes
        order.append("second in")
    thread.join()
    assert order == ["first done", "second in"]


@pytest.fixture(scope="module")
def tiny_repos(demo_config, tmp_path_factory):
    """Folders of a Flux.1 repo (diffusers transformer, BFL ae.safetensors, the demo's text encoders
    and tokenizers) and a DINOv2 repo, with random weights sized to the demo config's networks."""
    from sga_jax.models import dinov2, flux, vae

    base = demo_config()
    networks = get_task(base.task, base).networks
    root = tmp_path_factory.mktemp("repos")
    rngs = nnx.Rngs(7)
    flux_folder, prior_folder = root / "flux", root / "dinov2"
    flux.save(flux.Flux(networks.flux, rngs=rngs), flux_folder / "transformer", format="diffusers")
    vae.save(vae.AutoEncoder(dataclasses.replace(networks.vae, f16=False), rngs=rngs), flux_folder / "ae.safetensors",
             format="bfl")
    for part in ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"):
        shutil.copytree(Path(base.text.root) / part, flux_folder / part)
    dinov2.save(dinov2.Dinov2(networks.prior, rngs=rngs), prior_folder)
    return flux_folder, prior_folder


def _run_state(config):
    run = loop.build_run(config, jax.devices()[:1])
    state = state_lib.load_pretrained(run.task, state_lib.init_state(run.task, config, run.optimizer, run.setup),
                                      run.setup)
    return run, state.params["flux"], state_lib.init_frozen(run.task, config, run.setup)


def test_training_reads_hub_ids_value_for_value_as_the_local_folders(demo_config, tiny_repos, offline):
    flux_folder, prior_folder = tiny_repos
    snapshot = write_hub_cache(offline, FLUX_REPO, flux_folder)
    write_hub_cache(offline, PRIOR_REPO, prior_folder)
    local = demo_config(**{"model.flux.weights": str(flux_folder / "transformer"),
                           "model.vae.weights": str(flux_folder / "ae.safetensors"),
                           "model.prior.weights": str(prior_folder), "text.root": str(flux_folder)})
    remote = demo_config(**{"model.flux.weights": FLUX_REPO, "model.vae.weights": FLUX_REPO,
                            "model.prior.weights": PRIOR_REPO, "text.root": FLUX_REPO})
    _, local_flux, local_frozen = _run_state(local)
    run, remote_flux, remote_frozen = _run_state(remote)
    assert run.task.text_paths["t5"] == snapshot / "text_encoder_2"
    for name, (a, b) in {"flux": (local_flux, remote_flux), "frozen": (local_frozen, remote_frozen)}.items():
        leaves_a, leaves_b = jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)
        assert len(leaves_a) == len(leaves_b) > 0
        for (path, x), y in zip(leaves_a, leaves_b):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=name + jax.tree_util.keystr(path))


def _converted_params(directory: Path) -> list[np.ndarray]:
    model = converted.load_model("flux" if "flux" in directory.name else "dinov2", directory)
    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param))]


def test_convert_reads_hub_ids_value_for_value_as_the_local_folders(tiny_repos, offline, tmp_path):
    flux_folder, prior_folder = tiny_repos
    write_hub_cache(offline, FLUX_REPO, flux_folder)
    write_hub_cache(offline, PRIOR_REPO, prior_folder)
    for family, repo, folder in (("flux", FLUX_REPO, flux_folder / "transformer"), ("dinov2", PRIOR_REPO, prior_folder)):
        assert convert_main([family, repo, str(tmp_path / f"{family}_hub")]) == 0
        assert convert_main([family, str(folder), str(tmp_path / f"{family}_local")]) == 0
        for a, b in zip(_converted_params(tmp_path / f"{family}_hub"), _converted_params(tmp_path / f"{family}_local"),
                        strict=True):
            np.testing.assert_array_equal(a, b)


def test_the_command_line_honours_hf_home_and_hf_hub_offline(tiny_repos, tmp_path):
    _, prior_folder = tiny_repos
    home = tmp_path / "hf_home"
    write_hub_cache(home / "hub", PRIOR_REPO, prior_folder)
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HOME=str(home), HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    command = [sys.executable, "-m", "sga_jax.convert", "dinov2"]
    done = subprocess.run([*command, PRIOR_REPO, str(tmp_path / "out")], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "out" / converted.CONFIG_FILE).is_file()
    missing = subprocess.run([*command, "sga-test/missing", str(tmp_path / "none")], capture_output=True, text=True,
                             env=env, cwd=ROOT, timeout=300)
    assert missing.returncode == 2
    assert missing.stderr.startswith("error: sga-test/missing: not a local path, and sga-test/missing is not in "
                                     f"the Hugging Face cache ({home / 'hub'}) while HF_HUB_OFFLINE is set")
    assert missing.stderr.count("\n") == 1 and "Traceback" not in missing.stderr
