"""Flux text conditioning in JAX: prompts -> (txt, txt_ids, vec).

Flux conditions on two encoders (Black Forest Labs' `HFEmbedder`, diffusers' `FluxPipeline`):
  * T5 v1.1 XXL: prompts tokenised with `padding="max_length", truncation=True` to 512 tokens
    (dev; 256 for schnell); `txt` is T5's `last_hidden_state` (B, L, 4096).
  * CLIP ViT-L/14 text: the same padding to 77 tokens; `vec` is the pooled output (B, 768).
  * `txt_ids` are zeros (B, L, 3): text tokens sit at the origin of Flux's 3-axis RoPE.

Masking: both references call the encoders WITHOUT an attention mask (`attention_mask=None` in
BFL's `HFEmbedder.forward`; diffusers' `_get_t5_prompt_embeds` / `_get_clip_prompt_embeds` pass
only `input_ids`), so padding tokens are attended to and their outputs are kept; Flux was trained
on exactly that. `TextEncoder` does the same by default; `mask_t5=True` masks T5's padded keys for
models trained that way. The T5 mask is still returned by `tokenize` (and cached) for such uses.

Tokenizers are loaded from local directories with transformers (never from the hub itself: a
hub id in a text config is fetched once into the hub cache by `resolve_paths`, then read from
there). `default_text_config` is the `text` section of a config (where the encoders and
tokenizers are, the lengths and dtype) and `text_encoder_from_config` loads what it names.
`build_demo_tokenizers` trains small ones with the `tokenizers` library, and
`build_demo_text_folder` adds tiny random encoders in a Flux-layout folder, for tests and the demo.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from sga_jax import parallel
from sga_jax.errors import ConfigError
from sga_jax.models import clip as clip_family
from sga_jax.models import t5 as t5_family
from sga_jax.weights import hub

T5_TOKENIZER_FILES = ("tokenizer.json", "spiece.model")
CLIP_TOKENIZER_FILES = ("tokenizer.json", "vocab.json")
CLIP_SPECIAL = ("<|startoftext|>", "<|endoftext|>")
T5_SPECIAL = ("<pad>", "</s>", "<unk>")
FLUX_FOLDERS = {"t5": "text_encoder_2", "clip": "text_encoder", "t5_tokenizer": "tokenizer_2", "clip_tokenizer": "tokenizer"}


def default_text_config() -> ml_collections.ConfigDict:
    """The `text` section of a config: the Flux text encoders and how captions are encoded.

    root: a Flux.1 folder or hub id (black-forest-labs/FLUX.1-dev: only its text encoders and
      tokenizers are fetched); any of t5 / clip / t5_tokenizer / clip_tokenizer left empty is
      taken from its standard subfolder (text_encoder_2, text_encoder, tokenizer_2, tokenizer).
    t5, clip: save_pretrained directories (or safetensors files, or hub ids) of T5EncoderModel /
      CLIPTextModel.
    t5_tokenizer, clip_tokenizer: tokenizer directories or hub ids.
    t5_length: 512 for Flux.1-dev, 256 for schnell. clip_length: 77.
    dtype: compute and parameter dtype of both encoders. mask_t5: False as Flux (see the module docstring).
    batch_size: captions per encoding step on this process. records_per_shard: cache shard size
      (an interruption re-encodes at most one shard).
    """
    return ml_collections.ConfigDict({
        "root": "",
        "t5": "",
        "clip": "",
        "t5_tokenizer": "",
        "clip_tokenizer": "",
        "t5_length": 512,
        "clip_length": 77,
        "dtype": "bfloat16",
        "mask_t5": False,
        "batch_size": 16,
        "records_per_shard": 256,
    })


def resolve_paths(text_config: Any) -> dict[str, Path]:
    """The local paths of the four encoders / tokenizers of a text config: each field that is set
    (a path or hub id), else its subfolder of `root` (one resolution of the root for all four)."""
    paths, root = {}, None
    for field, folder in FLUX_FOLDERS.items():
        if text_config[field]:
            layout = hub.TOKENIZER if field.endswith("tokenizer") else hub.PRETRAINED
            paths[field] = hub.resolve(text_config[field], layout)
        elif text_config.root:
            root = root or hub.resolve_folder(text_config.root, (hub.FLUX_TEXT,))
            paths[field] = root / folder
        else:
            raise ConfigError(f"config.text.{field} is empty and config.text.root is not set; give one of them")
    return paths


def text_encoder_from_config(text_config: Any, mesh: jax.sharding.Mesh | None = None,
                             rules: Any = None) -> "TextEncoder":
    """Load the TextEncoder a text config describes; with `mesh`, parameters are placed straight
    into their shardings by logical axis names (`rules` from `sga_jax.parallel.resolve_rules`)."""
    paths = resolve_paths(text_config)
    shardings = None
    if mesh is not None:
        shardings = lambda abstract: parallel.state_shardings(abstract, mesh, rules)  # noqa: E731
    return TextEncoder.from_pretrained(
        paths["t5"], paths["clip"], paths["t5_tokenizer"], paths["clip_tokenizer"],
        t5_length=text_config.t5_length, clip_length=text_config.clip_length, dtype=text_config.dtype,
        t5_shardings=shardings, clip_shardings=shardings, mask_t5=text_config.mask_t5,
    )


def load_tokenizer(kind: str, path: str | os.PathLike) -> Any:
    """Load the "t5" or "clip" tokenizer saved in local directory `path` (transformers fast classes).

    Raises FileNotFoundError naming the path when the directory or its tokenizer files are missing.
    """
    import transformers

    files = {"t5": T5_TOKENIZER_FILES, "clip": CLIP_TOKENIZER_FILES}
    if kind not in files:
        raise ValueError(f"tokenizer kind {kind!r} is not 't5' or 'clip'")
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{kind} tokenizer directory not found: {path}")
    if not any((path / name).exists() for name in files[kind]):
        raise FileNotFoundError(
            f"{path} holds no {kind} tokenizer (expected one of {', '.join(files[kind])}); point it at a "
            "save_pretrained tokenizer folder, e.g. FLUX.1-dev/tokenizer_2 (T5) or FLUX.1-dev/tokenizer (CLIP)"
        )
    cls = transformers.T5TokenizerFast if kind == "t5" else transformers.CLIPTokenizerFast
    return cls.from_pretrained(str(path), local_files_only=True)


def tokenize(tokenizer: Any, prompts: Iterable[str], length: int) -> tuple[np.ndarray, np.ndarray]:
    """Flux's tokenizer call: pad to exactly `length`, truncate longer prompts (the closing special
    token is kept). Returns (ids, mask), both (B, length) int32."""
    prompts = list(prompts)
    if not all(isinstance(p, str) for p in prompts):
        raise TypeError("prompts must be a list of strings")
    out = tokenizer(prompts, padding="max_length", max_length=length, truncation=True, return_tensors="np")
    return out["input_ids"].astype(np.int32), out["attention_mask"].astype(np.int32)


def encode_tokens(
    t5_model: t5_family.T5EncoderModel,
    clip_model: clip_family.ClipTextModel,
    tokens: Mapping[str, jax.Array],
    *,
    mask_t5: bool = False,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The pure encoding step: token arrays -> (txt (B, L, d_t5), txt_ids (B, L, 3) zeros, vec (B, d_clip)).

    `tokens` holds `t5_ids`, `clip_ids` and (used only when `mask_t5`) `t5_mask`. Call it inside
    `jax.jit` with the models merged from their states (see `TextEncoder.encode_tokens`).
    """
    t5_mask = tokens["t5_mask"] if mask_t5 else None
    txt = t5_model(tokens["t5_ids"], t5_mask)
    _, vec = clip_model(tokens["clip_ids"])
    txt_ids = jnp.zeros((*txt.shape[:2], 3), jnp.float32)
    return txt, txt_ids, vec


@functools.partial(jax.jit, static_argnames=("graphdefs", "mask_t5"))
def _encode_jit(graphdefs: tuple[Any, Any], states: tuple[Any, Any], tokens: Mapping[str, jax.Array],
                mask_t5: bool) -> tuple[jax.Array, jax.Array, jax.Array]:
    t5_model = nnx.merge(graphdefs[0], states[0])
    clip_model = nnx.merge(graphdefs[1], states[1])
    return encode_tokens(t5_model, clip_model, tokens, mask_t5=mask_t5)


class TextEncoder:
    """Tokenizers + T5 + CLIP -> Flux conditioning `(txt, txt_ids, vec)`.

    Args:
      t5_model, clip_model: the NNX encoders (e.g. from `sga_jax.models.t5.load` / `clip.load`).
      t5_tokenizer, clip_tokenizer: transformers tokenizers (see `load_tokenizer`).
      t5_length: T5 tokens per prompt: 512 for Flux.1-dev, 256 for schnell.
      clip_length: CLIP tokens per prompt (77).
      mask_t5: mask T5's padded keys. Flux does not (see the module docstring); keep False for it.
    """

    def __init__(self, t5_model: t5_family.T5EncoderModel, clip_model: clip_family.ClipTextModel,
                 t5_tokenizer: Any, clip_tokenizer: Any, *, t5_length: int = 512, clip_length: int = 77,
                 mask_t5: bool = False):
        if clip_length > clip_model.config.max_position_embeddings:
            raise ValueError(
                f"clip_length {clip_length} exceeds the CLIP model's max_position_embeddings "
                f"{clip_model.config.max_position_embeddings}"
            )
        for name, tok, model_vocab in (("t5", t5_tokenizer, t5_model.config.vocab_size),
                                       ("clip", clip_tokenizer, clip_model.config.vocab_size)):
            if len(tok) > model_vocab:
                raise ValueError(f"{name} tokenizer has {len(tok)} tokens but the model's vocabulary has {model_vocab}")
        self.t5_model, self.clip_model = t5_model, clip_model
        self.t5_tokenizer, self.clip_tokenizer = t5_tokenizer, clip_tokenizer
        self.t5_length, self.clip_length = t5_length, clip_length
        self.mask_t5 = mask_t5

    @classmethod
    def from_pretrained(cls, t5_dir: str | os.PathLike, clip_dir: str | os.PathLike,
                        t5_tokenizer_dir: str | os.PathLike, clip_tokenizer_dir: str | os.PathLike, *,
                        t5_length: int = 512, clip_length: int = 77, dtype: str = "bfloat16",
                        t5_shardings: Any = None, clip_shardings: Any = None, mask_t5: bool = False) -> "TextEncoder":
        """Load both encoders (streaming, optionally straight into shardings) and both tokenizers
        from local directories, e.g. a Flux.1 folder's `text_encoder_2`, `text_encoder`,
        `tokenizer_2`, `tokenizer`. `dtype` sets compute and parameter dtype of both encoders."""
        t5_tokenizer = load_tokenizer("t5", t5_tokenizer_dir)
        clip_tokenizer = load_tokenizer("clip", clip_tokenizer_dir)
        t5_model = t5_family.load(t5_dir, shardings=t5_shardings, dtype=dtype, param_dtype=dtype)
        clip_model = clip_family.load(clip_dir, shardings=clip_shardings, dtype=dtype, param_dtype=dtype)
        return cls(t5_model, clip_model, t5_tokenizer, clip_tokenizer, t5_length=t5_length,
                   clip_length=clip_length, mask_t5=mask_t5)

    def tokenize(self, prompts: Iterable[str]) -> dict[str, np.ndarray]:
        """Prompts -> {"t5_ids", "t5_mask": (B, t5_length), "clip_ids": (B, clip_length)} int32 arrays."""
        prompts = list(prompts)
        t5_ids, t5_mask = tokenize(self.t5_tokenizer, prompts, self.t5_length)
        clip_ids, _ = tokenize(self.clip_tokenizer, prompts, self.clip_length)
        return {"t5_ids": t5_ids, "t5_mask": t5_mask, "clip_ids": clip_ids}

    def encode_tokens(self, tokens: Mapping[str, Any]) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Token arrays -> (txt, txt_ids, vec), compiled once per batch shape; the weights are
        passed to the compiled function as arguments."""
        arrays = {k: jnp.asarray(v) for k, v in tokens.items() if k in ("t5_ids", "t5_mask", "clip_ids")}
        t5_graph, t5_state = nnx.split(self.t5_model)
        clip_graph, clip_state = nnx.split(self.clip_model)
        return _encode_jit((t5_graph, clip_graph), (t5_state, clip_state), arrays, self.mask_t5)

    def __call__(self, prompts: Iterable[str]) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Prompts -> (txt (B, t5_length, d_t5), txt_ids (B, t5_length, 3), vec (B, d_clip))."""
        return self.encode_tokens(self.tokenize(prompts))

    def fingerprint(self) -> str:
        """Identity of everything that determines the embeddings: both tokenizers (their full
        serialised state), both encoders' weights (a checksum of every parameter's bits, its path,
        shape and dtype), the compute dtypes, the lengths and the masking. Caches are stamped with it."""
        digest = hashlib.sha256()
        for tok in (self.t5_tokenizer, self.clip_tokenizer):
            digest.update(tokenizer_digest(tok).encode())
        for model in (self.t5_model, self.clip_model):
            digest.update(params_digest(nnx.state(model, nnx.Param)).encode())
            digest.update(model.config.dtype.encode())
        digest.update(json.dumps([self.t5_length, self.clip_length, self.mask_t5]).encode())
        return digest.hexdigest()


def tokenizer_digest(tokenizer: Any) -> str:
    """sha256 of a fast tokenizer's serialised pipeline (vocabulary, merges, normalizer, ...) and
    its special tokens. The padding / truncation settings, which every call changes, are left out."""
    pipeline = json.loads(tokenizer.backend_tokenizer.to_str())
    pipeline.pop("padding", None)
    pipeline.pop("truncation", None)
    state = json.dumps(pipeline, sort_keys=True)
    special = json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str)
    return hashlib.sha256((state + special).encode()).hexdigest()


@jax.jit
def _bits_checksum(x: jax.Array) -> jax.Array:
    """Two position-weighted 32-bit hashes of an array's raw bits (uint32 wrap-around)."""
    width = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[x.dtype.itemsize]
    bits = jax.lax.bitcast_convert_type(x, width).astype(jnp.uint32).ravel()
    index = jnp.arange(bits.size, dtype=jnp.uint32)
    mixed = bits ^ (index * jnp.uint32(0x9E3779B1))
    return jnp.stack([jnp.sum(mixed * jnp.uint32(0x85EBCA6B)), jnp.sum((mixed ^ jnp.uint32(0x27D4EB2F)) * (index | 1))])


def params_digest(state: nnx.State) -> str:
    """sha256 over every parameter's path, shape, dtype and a checksum of its bits (on device)."""
    digest = hashlib.sha256()
    for path, var in sorted(nnx.to_flat_state(state), key=lambda item: tuple(map(str, item[0]))):
        value = var.get_value()
        sums = np.asarray(_bits_checksum(value)).tolist()
        digest.update(json.dumps([list(map(str, path)), list(value.shape), str(value.dtype), sums]).encode())
    return digest.hexdigest()


def build_demo_tokenizers(directory: str | os.PathLike, corpus: Iterable[str], *, t5_vocab_size: int = 200,
                          clip_vocab_size: int = 320, t5_max_length: int = 512) -> tuple[Path, Path]:
    """Train a small T5-style (Unigram) and CLIP-style (byte-level BPE) tokenizer on `corpus`.

    They are saved as transformers' `T5TokenizerFast` / `CLIPTokenizerFast` write them, in
    `directory/tokenizer_2` (T5) and `directory/tokenizer` (CLIP), the layout of a Flux.1 folder,
    so `load_tokenizer` and `TextEncoder.from_pretrained` read them like the real ones. As in the
    real vocabularies, T5 has <pad>=0, </s>=1, <unk>=2, and CLIP's <|startoftext|> and
    <|endoftext|> are the two largest ids (CLIP's legacy pooling takes the largest id).
    Returns (t5_dir, clip_dir).
    """
    import transformers
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers

    corpus = list(corpus)
    if not corpus:
        raise ValueError("build_demo_tokenizers needs a non-empty corpus")
    directory = Path(directory)

    unigram = Tokenizer(models.Unigram())
    unigram.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)]
    )
    unigram.train_from_iterator(corpus, trainers.UnigramTrainer(
        vocab_size=t5_vocab_size, special_tokens=list(T5_SPECIAL), unk_token="<unk>", show_progress=False))
    pieces = [(piece, score) for piece, score in json.loads(unigram.to_str())["model"]["vocab"]]
    t5_tok = transformers.T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=t5_max_length)
    t5_dir = directory / "tokenizer_2"
    t5_tok.save_pretrained(str(t5_dir))

    bpe = Tokenizer(models.BPE(end_of_word_suffix="</w>", continuing_subword_prefix=""))
    bpe.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""),
                             behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=clip_vocab_size, end_of_word_suffix="</w>", show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    model_json = json.loads(bpe.to_str())["model"]
    tokens = [token for token, _ in sorted(model_json["vocab"].items(), key=lambda item: item[1])]
    # Like CLIP's own vocabulary, hold every byte both inside and at the end of a word, so any
    # text encodes without unknown tokens; then the two special tokens, last.
    tokens += sorted({c + "</w>" for c in pre_tokenizers.ByteLevel.alphabet()} - set(tokens))
    vocab = {token: i for i, token in enumerate(tokens + list(CLIP_SPECIAL))}
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model_json["merges"]]
    clip_tok = transformers.CLIPTokenizerFast(vocab=vocab, merges=merges, model_max_length=77)
    clip_dir = directory / "tokenizer"
    clip_tok.save_pretrained(str(clip_dir))
    return t5_dir, clip_dir


def build_demo_text_folder(directory: str | os.PathLike, corpus: Iterable[str], *, seed: int = 0) -> Path:
    """A Flux-layout text folder for demos and tests: `build_demo_tokenizers` plus random tiny
    encoders sized to them (`T5Config.tiny`, `ClipTextConfig.tiny` with 77 positions), saved as
    transformers writes them in `text_encoder_2` / `text_encoder`. Point `TextEncoder.from_pretrained`
    or the encode CLI's `text.root` at the returned directory."""
    directory = Path(directory)
    t5_tok_dir, clip_tok_dir = build_demo_tokenizers(directory, corpus)
    t5_vocab = len(load_tokenizer("t5", t5_tok_dir))
    clip_vocab = len(load_tokenizer("clip", clip_tok_dir))
    rngs = nnx.Rngs(seed)
    t5_family.save(t5_family.T5EncoderModel(t5_family.T5Config.tiny(vocab_size=t5_vocab), rngs=rngs),
                   directory / "text_encoder_2")
    clip_config = clip_family.ClipTextConfig.tiny(vocab_size=clip_vocab, max_position_embeddings=77)
    clip_family.save(clip_family.ClipTextModel(clip_config, rngs=rngs), directory / "text_encoder")
    return directory
