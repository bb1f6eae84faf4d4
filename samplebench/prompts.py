"""Prompts and class labels for a sweep: image i of every cell gets the same condition.

The condition of image i is a function of the prompt config and i alone: a loaded set is indexed
with ``i mod len(set)``, so when num_images exceeds the size of the set the set simply cycles
(silently). A smaller subset is always a prefix of a larger one drawn with the same seed, so changing
num_images or count never reshuffles the images that were already generated.

Config group ``prompts`` (conf/prompts/*.yaml), selected by ``kind``:

- ``builtin``: the 32 prompts in :data:`BUILTIN_PROMPTS`.
- ``file``: ``path`` to .txt (one prompt per non-empty line), .csv, .jsonl or .parquet (``column``,
  default ``text``; optional ``id_column``).
- ``coco``: ``path`` to a COCO captions file (captions_val2014.json layout); ``count`` images drawn
  with ``seed``, one caption each.
- ``classes``: class labels for class-conditional models (:func:`load_labels`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from samplebench.errors import UsageError

# Written for this project: varied subjects, settings and styles, concrete and safe.
BUILTIN_PROMPTS: tuple[str, ...] = (
    "a red bicycle leaning against a brick wall, photograph",
    "a golden retriever puppy sitting in a field of yellow tulips",
    "a steaming cup of coffee on a wooden table next to an open book",
    "a lighthouse on a rocky cliff at sunset, oil painting",
    "a bowl of ramen with a soft-boiled egg and green onions, overhead shot",
    "a snowy mountain village at night with warm lights in the windows",
    "a tabby cat sleeping on a stack of old books",
    "a vintage blue pickup truck parked in front of a barn",
    "a watercolor painting of a hummingbird drinking from a pink flower",
    "a glass jar full of colorful marbles on a windowsill, soft morning light",
    "an astronaut riding a horse on the moon, digital art",
    "a busy street market in the rain with colorful umbrellas",
    "a close-up of a green tree frog on a wet leaf, macro photograph",
    "a wooden sailboat on a calm turquoise sea near a small island",
    "a stack of pancakes with blueberries and maple syrup",
    "a medieval stone castle surrounded by autumn forest, aerial view",
    "a pencil sketch of an old man reading a newspaper on a park bench",
    "a red fox walking through fresh snow in a birch forest",
    "a modern kitchen with white cabinets and a bowl of lemons on the counter",
    "a hot air balloon floating over green hills at dawn",
    "a pixel art scene of a small house with a garden and a pond",
    "a pair of worn leather boots on a doormat",
    "a koi pond with orange and white fish under lily pads",
    "a city skyline at dusk reflected in a river, long exposure photograph",
    "a ceramic teapot with a blue floral pattern, studio product photo",
    "an owl perched on a mossy branch under a full moon",
    "a child's drawing of a smiling sun over a green house, crayon",
    "a desert road with a lone cactus and distant mesas, cinematic",
    "a bookshelf filled with plants and colorful books in a cozy living room",
    "a penguin standing on an ice floe in the Antarctic, wildlife photograph",
    "a bowl of fresh strawberries and mint on a marble countertop",
    "a steam locomotive crossing a stone bridge in the mountains, 1920s postcard",
)

FILE_FORMATS = (".txt", ".csv", ".jsonl", ".parquet")


def _sha16(payload: Any) -> str:
    data = json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()
    return hashlib.sha256(data).hexdigest()[:16]


@dataclass(frozen=True)
class PromptSet:
    """Text prompts with stable ids; image i gets entry ``i mod len``."""

    kind: str
    texts: tuple[str, ...]
    ids: tuple[str, ...]
    source: str

    def __post_init__(self) -> None:
        if not self.texts or len(self.texts) != len(self.ids):
            raise ValueError(
                f"PromptSet needs equally many texts and ids, at least one; got {len(self.texts)}"
            )

    def __len__(self) -> int:
        return len(self.texts)

    def for_indices(self, indices: list[int]) -> tuple[list[str], list[str]]:
        """Texts and ids of images ``indices`` (cycling when an index exceeds the set)."""
        n = len(self.texts)
        return [self.texts[i % n] for i in indices], [self.ids[i % n] for i in indices]

    def fingerprint(self) -> str:
        """sha256 (16 hex digits) of kind, texts and ids; not of source, so moving a file keeps it."""
        return _sha16([self.kind, list(self.texts), list(self.ids)])


@dataclass(frozen=True)
class LabelSet:
    """Class labels; image i gets ``labels[i mod len]``."""

    labels: tuple[int, ...]
    source: str

    def __post_init__(self) -> None:
        if not self.labels:
            raise ValueError("LabelSet needs at least one label")

    def __len__(self) -> int:
        return len(self.labels)

    def for_indices(self, indices: list[int]) -> list[int]:
        """Labels of images ``indices`` (cycling when an index exceeds the set)."""
        n = len(self.labels)
        return [self.labels[i % n] for i in indices]

    def fingerprint(self) -> str:
        """sha256 (16 hex digits) of the labels."""
        return _sha16(["classes", list(self.labels)])


# ---------------------------------------------------------------------------------------------------
# Helpers


def _plain(cfg: Any) -> dict[str, Any]:
    """A plain dict from a dict or an OmegaConf node."""
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(cfg, DictConfig):
            return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        pass
    if not isinstance(cfg, Mapping):
        raise UsageError(f"prompts must be a mapping with a 'kind' key, got {cfg!r}; e.g. prompts=builtin")
    return dict(cfg)


def _is_int(v: Any) -> bool:
    return isinstance(v, int | np.integer) and not isinstance(v, bool)


def _seed(cfg: dict[str, Any]) -> int:
    seed = cfg.get("seed", 0)
    if seed is None:
        seed = 0
    if not _is_int(seed) or seed < 0:
        raise UsageError(f"prompts.seed={seed} must be a non-negative integer, e.g. prompts.seed=0")
    return int(seed)


def _path(cfg: dict[str, Any], kind: str, example: str) -> Path:
    raw = cfg.get("path")
    if raw is None or str(raw).strip() == "":
        raise UsageError(f"prompts={kind} needs a file; set prompts.path=, e.g. prompts.path={example}")
    path = Path(str(raw)).expanduser()
    if not path.exists():
        raise UsageError(f"prompts.path={raw} does not exist; set prompts.path= to an existing file")
    if not path.is_file():
        raise UsageError(f"prompts.path={raw} is not a file; set prompts.path= to a file")
    return path


# ---------------------------------------------------------------------------------------------------
# Text prompts


def load_prompts(cfg: Mapping[str, Any], num_images: int) -> PromptSet:
    """The prompt set of a ``prompts`` config (kind builtin, file or coco).

    The set does not depend on num_images: image i gets entry ``i mod len(set)``, so a set smaller
    than num_images cycles.
    """
    c = _plain(cfg)
    kind = c.get("kind")
    if kind == "builtin":
        ids = tuple(f"builtin:{k}" for k in range(len(BUILTIN_PROMPTS)))
        return PromptSet("builtin", BUILTIN_PROMPTS, ids, "builtin")
    if kind == "file":
        return _load_file(c)
    if kind == "coco":
        return _load_coco(c)
    if kind == "classes":
        raise UsageError(
            "prompts=classes gives class labels but this model takes text prompts; "
            "choose prompts=builtin, prompts=file or prompts=coco"
        )
    raise UsageError(f"prompts.kind={kind} is unknown; choose prompts=builtin, file, coco or classes")


def _load_file(c: dict[str, Any]) -> PromptSet:
    path = _path(c, "file", "prompts.txt")
    raw = c["path"]
    ext = path.suffix.lower()
    column = c.get("column") or "text"
    id_column = c.get("id_column")
    if ext not in FILE_FORMATS:
        hint = "; for a COCO captions file use prompts=coco" if ext == ".json" else ""
        raise UsageError(
            f"prompts.path={raw} has unknown extension '{ext}'{hint}; "
            f"set prompts.path= to a {', '.join(FILE_FORMATS[:-1])} or {FILE_FORMATS[-1]} file"
        )
    if ext == ".txt":
        if id_column is not None:
            raise UsageError(
                f"prompts.id_column={id_column} does not apply to .txt files (one prompt per line); "
                "remove prompts.id_column= or use a .csv, .jsonl or .parquet file"
            )
        lines = [ln.strip() for ln in _read_text(path, raw).splitlines()]
        texts = [ln for ln in lines if ln]
        if not texts:
            raise UsageError(f"prompts.path={raw} has no prompts (no non-empty lines); set prompts.path=")
        ids = [f"{path.name}:{k}" for k in range(len(texts))]
    else:
        records = _read_table(path, raw, ext)
        if not records:
            raise UsageError(f"prompts.path={raw} has no rows; set prompts.path= to a file with prompts")
        columns = (
            list(records[0].keys()) if ext != ".jsonl" else list(dict.fromkeys(k for r in records for k in r))
        )
        for key, name in ((column, "column"), (id_column, "id_column")):
            if key is not None and key not in columns:
                raise UsageError(
                    f"prompts.path={raw} has no column '{key}'; columns are: {', '.join(map(str, columns))}; "
                    f"set prompts.{name}="
                )
        texts = [_cell(r.get(column), raw, k, column, "column") for k, r in enumerate(records)]
        if id_column is None:
            ids = [f"{path.name}:{k}" for k in range(len(records))]
        else:
            ids = [_cell(r.get(id_column), raw, k, id_column, "id_column") for k, r in enumerate(records)]
    return PromptSet("file", tuple(texts), tuple(ids), f"file:{path.resolve()} (column {column})")


def _read_text(path: Path, raw: Any) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UsageError(f"prompts.path={raw} is not UTF-8 text ({e.reason}); save it as UTF-8") from e


def _read_table(path: Path, raw: Any, ext: str) -> list[dict[str, Any]]:
    """Rows of a .csv, .jsonl or .parquet file as dicts."""
    import pandas as pd

    if ext == ".jsonl":
        rows = []
        for n, line in enumerate(_read_text(path, raw).splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise UsageError(
                    f"prompts.path={raw} line {n} is not valid JSON ({e.msg}); fix the file"
                ) from e
            if not isinstance(row, dict):
                raise UsageError(
                    f"prompts.path={raw} line {n} is not a JSON object; write one object per line"
                )
            rows.append(row)
        return rows
    try:
        if ext == ".csv":
            df = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8")
        else:
            df = pd.read_parquet(path)
    except pd.errors.EmptyDataError:
        return []
    except ImportError as e:
        raise UsageError(f"reading prompts.path={raw} needs pyarrow; run `pip install pyarrow`") from e
    except (ValueError, OSError, pd.errors.ParserError) as e:
        msg = " ".join(str(e).split())
        raise UsageError(f"cannot read prompts.path={raw}: {msg}; fix the file or set prompts.path=") from e
    df.columns = [str(c) for c in df.columns]
    return df.to_dict(orient="records")


def _cell(value: Any, raw: Any, row: int, column: str, key: str) -> str:
    """A non-empty string from one table cell, or a UsageError naming the row."""
    missing = value is None or (isinstance(value, float) and np.isnan(value))
    text = "" if missing else str(value).strip()
    if not text:
        raise UsageError(
            f"prompts.path={raw} row {row} has an empty '{column}'; fill or remove the row, "
            f"or set prompts.{key}="
        )
    return text


def _load_coco(c: dict[str, Any]) -> PromptSet:
    path = _path(c, "coco", "annotations/captions_val2014.json")
    raw = c["path"]
    count = c.get("count", 1000)
    seed = _seed(c)
    if count is not None and (not _is_int(count) or count <= 0):
        raise UsageError(f"prompts.count={count} must be a positive integer or null (all images)")
    try:
        data = json.loads(_read_text(path, raw))
    except json.JSONDecodeError as e:
        raise UsageError(f"prompts.path={raw} is not valid JSON ({e.msg}); set prompts.path=") from e
    if not (
        isinstance(data, dict)
        and isinstance(data.get("images"), list)
        and isinstance(data.get("annotations"), list)
    ):
        raise UsageError(
            f"prompts.path={raw} is not a COCO captions file (needs 'images' and 'annotations' lists, "
            "as in captions_val2014.json); set prompts.path="
        )
    try:
        image_ids = {int(im["id"]) for im in data["images"]}
        by_image: dict[int, list[tuple[int, str]]] = {}
        for a in data["annotations"]:
            image_id = int(a["image_id"])
            caption = " ".join(str(a["caption"]).split())
            if image_id in image_ids and caption:
                by_image.setdefault(image_id, []).append((int(a["id"]), caption))
    except (KeyError, TypeError, ValueError) as e:
        raise UsageError(
            f"prompts.path={raw} has a malformed image or annotation entry ({type(e).__name__}: {e}); "
            "images need 'id', annotations 'image_id', 'id' and 'caption'"
        ) from e
    available = sorted(by_image)
    if not available:
        raise UsageError(f"prompts.path={raw} has no captioned images; set prompts.path=")
    if count is None:
        count = len(available)
    if count > len(available):
        raise UsageError(
            f"prompts.count={count} but prompts.path={raw} has only {len(available)} captioned images; "
            f"set prompts.count= at most {len(available)}, or null for all"
        )
    # One generator: first the image order, then one caption per chosen image in that order, so the
    # images and captions chosen for count=k are a prefix of those for any larger count.
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(available))[:count]
    texts, ids = [], []
    for pos in order:
        image_id = available[int(pos)]
        anns = sorted(by_image[image_id])
        ann_id, caption = anns[int(rng.integers(len(anns)))]
        texts.append(caption)
        ids.append(f"coco:{image_id}:{ann_id}")
    return PromptSet("coco", tuple(texts), tuple(ids), f"coco:{path.resolve()} (count={count}, seed={seed})")


# ---------------------------------------------------------------------------------------------------
# Class labels


def load_labels(cfg: Mapping[str, Any], num_classes: int, num_images: int) -> LabelSet:
    """Class labels of a ``prompts=classes`` config; image i gets ``labels[i mod len]``.

    select=all: 0..num_classes-1 in order, cycling. select=list: ``labels``, cycling.
    select=random: ``default_rng(seed).integers(0, num_classes, num_images)`` (a prefix of the draws
    for any larger num_images, so label i does not depend on num_images).
    """
    c = _plain(cfg)
    kind = c.get("kind")
    if kind != "classes":
        raise UsageError(
            f"prompts={kind} gives text prompts but this model takes class labels; set prompts=classes"
        )
    if not _is_int(num_classes) or num_classes <= 0:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes}")
    select = c.get("select", "all")
    if select == "all":
        return LabelSet(tuple(range(num_classes)), f"classes:all ({num_classes} classes)")
    if select == "list":
        labels = c.get("labels") or []
        if not isinstance(labels, list | tuple) or not labels:
            raise UsageError(
                "prompts.select=list needs class labels; set prompts.labels=, e.g. prompts.labels=[1,207,360]"
            )
        for v in labels:
            if not _is_int(v) or not 0 <= v < num_classes:
                raise UsageError(
                    f"prompts.labels has {v!r}, not a class of this model; "
                    f"set prompts.labels= to integers in 0..{num_classes - 1}"
                )
        return LabelSet(tuple(int(v) for v in labels), f"classes:list ({len(labels)} labels)")
    if select == "random":
        if not _is_int(num_images) or num_images <= 0:
            raise ValueError(f"num_images must be a positive integer, got {num_images}")
        seed = _seed(c)
        drawn = np.random.default_rng(seed).integers(0, num_classes, num_images)
        return LabelSet(tuple(int(v) for v in drawn), f"classes:random (seed={seed}, {num_classes} classes)")
    raise UsageError(f"prompts.select={select} is unknown; set prompts.select=all, list or random")
