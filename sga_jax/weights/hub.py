"""Hugging Face hub ids wherever a weight or model folder goes.

Every option that names weights or a model folder (`config.model.*.weights`, `config.text.*`,
`convert SRC`, `sample --root / --transformer / --vae`, `evaluate --dinov2 / --clip / ...`) takes
a local path or a hub id:

    org/name[@revision][:path]         black-forest-labs/FLUX.1-dev, facebook/dinov2-base@main,
                                       black-forest-labs/FLUX.1-dev:transformer (a folder of the repo)
    hf://org/name[@revision][:path]    the same, never read as a local path

A string that names an existing local file or folder is that path, so `ckpt/flux` stays local
when it exists. `resolve(spec, layout)` turns either form into a local path once, where the path
enters (a stage's configure, a command line): the `Layout` says which files of a folder the
reader needs (e.g. Flux: BFL's single file if the folder has one, else the diffusers
`transformer/` folder), the same choice is made for a local folder and for a repo, and only those
files are fetched (`snapshot_download` with `allow_patterns` naming them, into the hub cache:
`HF_HOME` / `HF_HUB_CACHE`, `HF_HUB_OFFLINE`, `HF_TOKEN` and `hf auth login` tokens work as with
the hub's own tools). The result is then read exactly as a local folder is.

Processes that share a cache (the processes of one host in a multi-host run) take a lock per
repo: one downloads, the others wait and then find the files in the cache. Errors are
`HubError`s that say what to do: check the id, log in, accept a gated model's license, or
download once while online.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import fnmatch
import functools
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

from sga_jax.errors import CheckpointError, HubError

HUB_PREFIX = "hf://"
_HUB_ID = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<revision>[^:]+))?(?::(?P<path>.+))?")


@dataclasses.dataclass(frozen=True)
class HubId:
    """A parsed hub id: repo, optional revision (branch, tag or commit) and path inside the repo."""

    repo: str
    revision: str | None = None
    path: str = ""

    def __str__(self) -> str:
        return self.repo + (f"@{self.revision}" if self.revision else "") + (f":{self.path}" if self.path else "")


@dataclasses.dataclass(frozen=True)
class Choice:
    """One way a folder can hold what a reader needs: selected when a file matches one of
    `markers`; `files` are the patterns to fetch, `target` the path handed to the reader ("" =
    the folder). Patterns match whole paths relative to the folder; `*` stays inside one folder
    level and a trailing `/**` takes everything below a folder."""

    markers: tuple[str, ...]
    files: tuple[str, ...]
    target: str = ""


@dataclasses.dataclass(frozen=True)
class Layout:
    """What one kind of reader needs from a folder: `choices` in order of preference."""

    name: str
    choices: tuple[Choice, ...]


PICKLES = ("*.bin", "*.pt", "*.pth", "*.ckpt")  # read by the allow-listing unpickler (weights.torch_pickle)


def weights_folder(folder: str = "") -> tuple[Choice, Choice]:
    """The weights of a save_pretrained-style `folder` (or the folder itself): its safetensors with
    the JSON files beside them, else (no safetensors) its PyTorch pickles."""
    prefix = f"{folder}/" if folder else ""
    return (Choice((f"{prefix}*.safetensors",), (f"{prefix}*.json", f"{prefix}*.safetensors"), folder),
            Choice(tuple(prefix + p for p in PICKLES), (f"{prefix}*.json", *(prefix + p for p in PICKLES)), folder))


def single_file(name: str) -> Choice:
    """A checkpoint that is one file of the folder, e.g. BFL's flux1-dev.safetensors."""
    return Choice((name,), (name,), name)


CONVERTED = Choice(("sga_config.json",), ("sga_config.json", "params/**"))
PRETRAINED = Layout("save_pretrained model (config.json + weights)", (CONVERTED, *weights_folder()))
FLUX = Layout("Flux transformer", (CONVERTED, single_file("flux1-dev.safetensors"),
                                   single_file("flux1-schnell.safetensors"), *weights_folder("transformer"),
                                   *weights_folder()))
VAE = Layout("Flux VAE", (CONVERTED, single_file("ae.safetensors"), *weights_folder("vae"), *weights_folder()))
TOKENIZER_FILES = ("*.json", "*.model", "*.txt")
TOKENIZER = Layout("tokenizer", (Choice(("*.json", "*.model"), TOKENIZER_FILES),))
CLIP_MODEL = Layout("CLIPModel with its tokenizer", (Choice(("*.safetensors",), ("*.json", "*.safetensors", *TOKENIZER_FILES)),))
FLUX_TEXT = Layout("Flux.1 text encoders and tokenizers", (Choice(("text_encoder/*.json",), tuple(
    f"{folder}/{pattern}" for folder, patterns in (
        ("text_encoder", ("*.json", "*.safetensors")), ("text_encoder_2", ("*.json", "*.safetensors")),
        ("tokenizer", TOKENIZER_FILES), ("tokenizer_2", TOKENIZER_FILES),
    ) for pattern in patterns)),))


def parse(spec: str | os.PathLike) -> HubId | None:
    """The hub id `spec` names, or None when it is a local path (an existing file or folder, or a
    string that is not of the form org/name[@revision][:path])."""
    text = os.fspath(spec)
    forced = text.startswith(HUB_PREFIX)
    if forced:
        text = text[len(HUB_PREFIX):]
    elif not text or Path(text).exists():
        return None
    match = _HUB_ID.fullmatch(text)
    if match is None:
        if forced:
            raise HubError(f"{spec}: not a hub id; expected hf://org/name[@revision][:path]")
        return None
    return HubId(match["repo"], match["revision"], (match["path"] or "").strip("/"))


def resolve(spec: str | os.PathLike, layout: Layout) -> Path:
    """The local path a reader of `layout` should open for `spec` (see the module docstring).

    Local paths: a file (or a missing path) is returned as it is, for its reader to open or
    report; a folder gives the target of the first choice of `layout` it holds (a CheckpointError
    names what was looked for when it holds none). Hub ids: the same choice, made on the repo's
    file list; only its files are fetched.
    """
    hub_id = parse(spec)
    if hub_id is None:
        return select_local(Path(spec), layout)
    folder, choices = _fetch(hub_id, (layout,), os.fspath(spec))
    return folder / choices[0].target if choices else folder


def resolve_folder(spec: str | os.PathLike, layouts: Sequence[Layout]) -> Path:
    """The local folder `spec` names, holding what each of `layouts` needs from it (e.g. a Flux.1
    folder for sampling: the transformer, the VAE, the text encoders and the tokenizers)."""
    hub_id = parse(spec)
    if hub_id is None:
        if not Path(spec).is_dir():
            raise FileNotFoundError(errno.ENOENT, "no such folder, and not a hub id (org/name)", os.fspath(spec))
        return Path(spec)
    return _fetch(hub_id, tuple(layouts), os.fspath(spec))[0]


def select_local(path: Path, layout: Layout) -> Path:
    """`path` itself for a file (or anything that is not a folder: its reader reports it); for a
    folder, the target of the first choice of `layout` whose marker it holds."""
    if not path.is_dir():
        return path
    choice = select(_local_files(path), layout)
    if choice is None:
        raise CheckpointError(f"{path}: holds no {layout.name} (looked for {_markers(layout)})")
    return path / choice.target


def select(files: Sequence[str], layout: Layout) -> Choice | None:
    """The first choice of `layout` whose marker matches one of `files` (paths relative to the folder)."""
    for choice in layout.choices:
        if any(matches(name, marker) for name in files for marker in choice.markers):
            return choice
    return None


def matches(name: str, pattern: str) -> bool:
    """Whether relative path `name` matches `pattern` (`*` within one level; `dir/**` below dir)."""
    if pattern.endswith("/**"):
        return name.startswith(pattern[:-2])
    parts, wanted = name.split("/"), pattern.split("/")
    return len(parts) == len(wanted) and all(fnmatch.fnmatchcase(p, w) for p, w in zip(parts, wanted))


def _markers(layout: Layout) -> str:
    return ", ".join(marker for choice in layout.choices for marker in choice.markers)


def _local_files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder).as_posix()) for p in folder.rglob("*") if p.is_file())


@functools.lru_cache(maxsize=None)
def _fetch(hub_id: HubId, layouts: tuple[Layout, ...], spec: str) -> tuple[Path, list[Choice]]:
    """(local path of `hub_id`, the choice made for each layout), fetching the files they need;
    once per process (later calls for the same id and layouts ask nothing of the hub). When
    `:path` names a file, that file alone is fetched and no choice is made."""
    import huggingface_hub as hf

    with _repo_lock(hub_id.repo):
        listing, commit, reason = _remote_listing(hub_id, spec)
        snapshot = None if listing is not None else _cached_snapshot(hub_id, spec, reason)
        files = listing if listing is not None else _local_files(snapshot)
        one_file = bool(hub_id.path) and hub_id.path in files
        folder_files = _under(files, hub_id.path)
        choices = [] if one_file else [_select_or_fail(folder_files, layout, hub_id, spec, cached=listing is None)
                                       for layout in layouts]
        if snapshot is None:
            wanted = [hub_id.path] if one_file else [
                _join(hub_id.path, name) for name in folder_files
                if any(matches(name, pattern) for choice in choices for pattern in choice.files)]
            try:
                snapshot = Path(hf.snapshot_download(hub_id.repo, revision=commit,
                                                     allow_patterns=[_escape(name) for name in wanted]))
            except Exception as error:  # noqa: BLE001: the hub's errors are explained, the rest reported
                _raise_for_hub_error(error, hub_id, spec)
                raise HubError(f"{spec}: downloading from {hub_id.repo} failed: {type(error).__name__}: {error}") from error
    return (snapshot / hub_id.path if hub_id.path else snapshot), choices


def _remote_listing(hub_id: HubId, spec: str | os.PathLike) -> tuple[list[str] | None, str | None, str]:
    """(every file of the repo at the revision, its commit, "") from the hub; (None, None, why)
    when offline or when the hub cannot be reached (the cache is used instead)."""
    import huggingface_hub as hf

    if hf.is_offline_mode():
        return None, None, "HF_HUB_OFFLINE is set"
    try:
        info = hf.HfApi().repo_info(hub_id.repo, revision=hub_id.revision)
    except Exception as error:  # noqa: BLE001: the hub's errors are explained; a network failure falls back to the cache
        _raise_for_hub_error(error, hub_id, spec)
        return None, None, f"the hub cannot be reached ({type(error).__name__}: {error})"
    return [sibling.rfilename for sibling in info.siblings or ()], info.sha, ""


def _under(files: Sequence[str], path: str) -> list[str]:
    """`files` inside folder `path` of the repo, relative to it."""
    if not path:
        return list(files)
    prefix = path + "/"
    return [name[len(prefix):] for name in files if name.startswith(prefix)]


def _join(path: str, name: str) -> str:
    return f"{path}/{name}" if path else name


def _escape(name: str) -> str:
    """An exact file name as an fnmatch pattern (huggingface_hub filters with fnmatch)."""
    return re.sub(r"([*?\[])", r"[\1]", name)


def _select_or_fail(files: Sequence[str], layout: Layout, hub_id: HubId, spec: str | os.PathLike, *,
                    cached: bool = False) -> Choice:
    choice = select(files, layout)
    if choice is None:
        where = f"folder {hub_id.path!r} of " if hub_id.path else ""
        state = "the cached copy of " if cached else ""
        raise HubError(
            f"{spec}: {state}{where}repo {hub_id.repo} holds no {layout.name} (looked for {_markers(layout)}); "
            f"check the id, or name the folder that holds it with {hub_id.repo}:FOLDER"
        )
    return choice


def _cached_snapshot(hub_id: HubId, spec: str | os.PathLike, reason: str) -> Path:
    """The cached snapshot of `hub_id` when the hub cannot be asked (offline or unreachable)."""
    import huggingface_hub as hf
    from huggingface_hub import constants

    try:
        return Path(hf.snapshot_download(hub_id.repo, revision=hub_id.revision, local_files_only=True))
    except Exception as error:  # noqa: BLE001: LocalEntryNotFoundError and its kin
        raise HubError(
            f"{spec}: not a local path, and {hub_id.repo}"
            f"{'@' + hub_id.revision if hub_id.revision else ''} is not in the Hugging Face cache "
            f"({constants.HF_HUB_CACHE}) while {reason}; download it once online "
            f"(`hf download {hub_id.repo}`, or run this again without HF_HUB_OFFLINE), or give a local folder"
        ) from error


def _raise_for_hub_error(error: Exception, hub_id: HubId, spec: str | os.PathLike) -> None:
    """Raise a HubError saying what to do for the hub's own errors; return for anything else."""
    from huggingface_hub import errors

    page = f"https://huggingface.co/{hub_id.repo}"
    if isinstance(error, errors.GatedRepoError):
        raise HubError(f"{spec}: {hub_id.repo} is a gated model: accept its license at {page}, then log in "
                       "with `hf auth login` (or set HF_TOKEN)") from error
    if isinstance(error, errors.RepositoryNotFoundError):
        raise HubError(f"{spec}: not a local path, and there is no Hugging Face repo {hub_id.repo} you can "
                       "read: check the id, or log in with `hf auth login` (or set HF_TOKEN) if it is private") from error
    if isinstance(error, errors.RevisionNotFoundError):
        raise HubError(f"{spec}: {hub_id.repo} has no revision {hub_id.revision!r} (a branch, tag or commit)") from error
    if isinstance(error, errors.HfHubHTTPError) and not isinstance(error, errors.OfflineModeIsEnabled):
        raise HubError(f"{spec}: the hub refused the request for {hub_id.repo}: {error}") from error


@contextlib.contextmanager
def _repo_lock(repo: str) -> Iterator[None]:
    """An exclusive lock on `repo` in the hub cache, so that one process of those sharing the cache
    downloads and the others wait for it."""
    from huggingface_hub import constants

    locks = Path(constants.HF_HUB_CACHE) / ".locks" / "sga_jax"
    try:
        locks.mkdir(parents=True, exist_ok=True)
        handle = open(locks / (repo.replace("/", "--") + ".lock"), "w")
    except OSError:  # a read-only cache: nothing will be written to it, so there is nothing to guard
        yield
        return
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
