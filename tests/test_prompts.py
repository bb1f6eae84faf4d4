import json
from pathlib import Path

import pandas as pd
import pytest
from omegaconf import OmegaConf

from samplebench.errors import UsageError
from samplebench.prompts import BUILTIN_PROMPTS, LabelSet, PromptSet, load_labels, load_prompts

CONF = Path(__file__).resolve().parents[1] / "conf" / "prompts"


def conf(name: str, **overrides):
    """A prompts group file with overrides, as Hydra would compose it."""
    cfg = OmegaConf.load(CONF / f"{name}.yaml")
    return OmegaConf.merge(cfg, overrides)


# --- builtin -----------------------------------------------------------------------------------------


def test_builtin_has_32_distinct_prompts():
    ps = load_prompts(conf("builtin"), num_images=10)
    assert ps.kind == "builtin"
    assert len(ps) == 32 and len(set(ps.texts)) == 32
    assert ps.texts == BUILTIN_PROMPTS
    assert ps.ids == tuple(f"builtin:{k}" for k in range(32))
    assert all(t.strip() == t and len(t) > 10 for t in ps.texts)


def test_builtin_cycles_and_does_not_depend_on_num_images():
    a = load_prompts({"kind": "builtin"}, num_images=5)
    b = load_prompts({"kind": "builtin"}, num_images=100)
    assert a == b and a.fingerprint() == b.fingerprint()
    texts, ids = a.for_indices([0, 31, 32, 65])
    assert texts == [BUILTIN_PROMPTS[0], BUILTIN_PROMPTS[31], BUILTIN_PROMPTS[0], BUILTIN_PROMPTS[1]]
    assert ids == ["builtin:0", "builtin:31", "builtin:0", "builtin:1"]


# --- file formats ------------------------------------------------------------------------------------

ROWS = [("a cat", "c1"), ("a dog, photograph", "d2"), ("a boat", "b3")]


def write(tmp_path: Path, fmt: str, column: str = "text") -> Path:
    path = tmp_path / f"prompts.{fmt}"
    if fmt == "txt":
        path.write_text("a cat\n\n  a dog, photograph  \n\na boat\n", encoding="utf-8")
    elif fmt == "csv":
        pd.DataFrame({column: [r[0] for r in ROWS], "key": [r[1] for r in ROWS]}).to_csv(path, index=False)
    elif fmt == "jsonl":
        path.write_text("\n".join(json.dumps({column: t, "key": k}) for t, k in ROWS) + "\n")
    elif fmt == "parquet":
        pd.DataFrame({column: [r[0] for r in ROWS], "key": [r[1] for r in ROWS]}).to_parquet(path)
    return path


@pytest.mark.parametrize("fmt", ["txt", "csv", "jsonl", "parquet"])
def test_file_formats(tmp_path, fmt):
    path = write(tmp_path, fmt)
    ps = load_prompts(conf("file", path=str(path)), num_images=7)
    assert ps.kind == "file"
    assert ps.texts == tuple(r[0] for r in ROWS)
    assert ps.ids == tuple(f"prompts.{fmt}:{k}" for k in range(3))
    texts, ids = ps.for_indices(list(range(7)))
    assert texts == [ROWS[i % 3][0] for i in range(7)]
    assert ids[3] == ids[0] and ids[6] == ids[0]


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_file_column_and_id_column(tmp_path, fmt):
    path = write(tmp_path, fmt, column="caption")
    ps = load_prompts(conf("file", path=str(path), column="caption", id_column="key"), num_images=3)
    assert ps.texts == tuple(r[0] for r in ROWS)
    assert ps.ids == tuple(r[1] for r in ROWS)
    assert ps.for_indices([4]) == (["a dog, photograph"], ["d2"])


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_file_missing_column(tmp_path, fmt):
    path = write(tmp_path, fmt, column="caption")
    with pytest.raises(UsageError, match=r"no column 'text'; columns are: caption, key; set prompts.column="):
        load_prompts(conf("file", path=str(path)), num_images=3)
    with pytest.raises(UsageError, match=r"no column 'nope'.*prompts.id_column="):
        load_prompts(conf("file", path=str(path), column="caption", id_column="nope"), num_images=3)


def test_file_errors(tmp_path):
    with pytest.raises(UsageError, match=r"prompts.path="):
        load_prompts(conf("file"), num_images=3)
    with pytest.raises(UsageError, match=r"prompts.path=.*does not exist"):
        load_prompts(conf("file", path=str(tmp_path / "missing.txt")), num_images=3)
    with pytest.raises(UsageError, match=r"prompts.path=.*not a file"):
        load_prompts(conf("file", path=str(tmp_path)), num_images=3)
    other = tmp_path / "prompts.xlsx"
    other.write_text("x")
    with pytest.raises(UsageError, match=r"prompts.path=.*unknown extension '.xlsx'"):
        load_prompts(conf("file", path=str(other)), num_images=3)
    js = tmp_path / "captions.json"
    js.write_text("{}")
    with pytest.raises(UsageError, match=r"prompts=coco"):
        load_prompts(conf("file", path=str(js)), num_images=3)
    for name, content in [
        ("empty.txt", "\n \n"),
        ("empty.csv", ""),
        ("header.csv", "text\n"),
        ("e.jsonl", "\n"),
    ]:
        p = tmp_path / name
        p.write_text(content)
        with pytest.raises(UsageError, match=r"prompts.path=") as e:
            load_prompts(conf("file", path=str(p)), num_images=3)
        assert "\n" not in str(e.value)
    blank = tmp_path / "blank.csv"
    blank.write_text('text\na cat\n""\n')
    with pytest.raises(UsageError, match=r"row 1 has an empty 'text'.*prompts.column="):
        load_prompts(conf("file", path=str(blank)), num_images=3)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": \n')
    with pytest.raises(UsageError, match=r"prompts.path=.*line 2 is not valid JSON"):
        load_prompts(conf("file", path=str(bad)), num_images=3)
    txt = write(tmp_path, "txt")
    with pytest.raises(UsageError, match=r"prompts.id_column="):
        load_prompts(conf("file", path=str(txt), id_column="key"), num_images=3)


def test_kind_errors():
    with pytest.raises(UsageError, match=r"prompts.kind=nope"):
        load_prompts({"kind": "nope"}, num_images=3)
    with pytest.raises(UsageError, match=r"prompts=classes"):
        load_prompts(conf("classes"), num_images=3)
    with pytest.raises(UsageError, match=r"prompts=classes"):
        load_labels(conf("builtin"), num_classes=10, num_images=3)


# --- COCO --------------------------------------------------------------------------------------------


@pytest.fixture
def coco(tmp_path) -> tuple[Path, dict[int, dict[int, str]]]:
    """A captions_val2014.json-like file: 20 images with 2-5 captions each, plus one uncaptioned image."""
    images, annotations, truth = [], [], {}
    ann_id = 1000
    for k in range(20):
        image_id = 7 + 13 * k
        images.append({"id": image_id, "file_name": f"COCO_val2014_{image_id:012d}.jpg"})
        truth[image_id] = {}
        for j in range(2 + k % 4):
            ann_id += 3
            caption = f"image {image_id} caption {j}"
            truth[image_id][ann_id] = caption
            annotations.append({"image_id": image_id, "id": ann_id, "caption": f"  {caption} \n"})
    images.append({"id": 999999, "file_name": "uncaptioned.jpg"})
    annotations.reverse()  # the loader must not depend on file order
    path = tmp_path / "captions_val2014.json"
    path.write_text(json.dumps({"info": {}, "images": images, "annotations": annotations}))
    return path, truth


def test_coco_subset(coco):
    path, truth = coco
    ps = load_prompts(conf("coco", path=str(path), count=8, seed=0), num_images=100)
    assert ps.kind == "coco" and len(ps) == 8
    image_ids = [int(i.split(":")[1]) for i in ps.ids]
    assert len(set(image_ids)) == 8  # distinct images, one caption each
    for text, pid in zip(ps.texts, ps.ids, strict=True):
        prefix, image_id, ann_id = pid.split(":")
        assert prefix == "coco"
        assert truth[int(image_id)][int(ann_id)] == text  # caption belongs to its image, whitespace stripped
        assert text == text.strip() and "\n" not in text


def test_coco_determinism_and_prefix(coco):
    path, _ = coco
    a = load_prompts(conf("coco", path=str(path), count=8, seed=0), num_images=1)
    b = load_prompts(conf("coco", path=str(path), count=8, seed=0), num_images=50)
    assert a == b and a.fingerprint() == b.fingerprint()
    c = load_prompts(conf("coco", path=str(path), count=8, seed=1), num_images=1)
    assert {i.split(":")[1] for i in c.ids} != {i.split(":")[1] for i in a.ids}
    assert c.fingerprint() != a.fingerprint()
    everything = load_prompts(conf("coco", path=str(path), count=None, seed=0), num_images=1)
    assert len(everything) == 20  # the uncaptioned image is not available
    assert everything.ids[:8] == a.ids  # a smaller count is a prefix of a larger one


def test_coco_caption_choice_varies(coco):
    path, truth = coco
    chosen = set()
    for seed in range(10):
        ps = load_prompts(conf("coco", path=str(path), count=None, seed=seed), num_images=1)
        chosen |= set(ps.ids)
    caption_indices = {sorted(truth[int(i.split(":")[1])]).index(int(i.split(":")[2])) for i in chosen}
    assert len(caption_indices) > 1  # not always the first caption


def test_coco_errors(coco, tmp_path):
    path, _ = coco
    with pytest.raises(UsageError, match=r"prompts.path="):
        load_prompts(conf("coco"), num_images=3)
    with pytest.raises(UsageError, match=r"prompts.count=21 .* only 20 captioned images; set prompts.count="):
        load_prompts(conf("coco", path=str(path), count=21), num_images=3)
    with pytest.raises(UsageError, match=r"prompts.count=0"):
        load_prompts(conf("coco", path=str(path), count=0), num_images=3)
    with pytest.raises(UsageError, match=r"prompts.seed=-1"):
        load_prompts(conf("coco", path=str(path), seed=-1), num_images=3)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"caption": "x"}]))
    with pytest.raises(UsageError, match=r"prompts.path=.*not a COCO captions file"):
        load_prompts(conf("coco", path=str(bad)), num_images=3)
    bad.write_text("{not json")
    with pytest.raises(UsageError, match=r"prompts.path=.*not valid JSON"):
        load_prompts(conf("coco", path=str(bad)), num_images=3)
    bad.write_text(json.dumps({"images": [{"id": 1}], "annotations": [{"image_id": 1, "caption": "x"}]}))
    with pytest.raises(UsageError, match=r"prompts.path=.*malformed"):
        load_prompts(conf("coco", path=str(bad)), num_images=3)


# --- class labels ------------------------------------------------------------------------------------


def test_labels_all():
    ls = load_labels(conf("classes"), num_classes=10, num_images=25)
    assert ls.labels == tuple(range(10))
    assert ls.for_indices([0, 9, 10, 23]) == [0, 9, 0, 3]


def test_labels_list():
    ls = load_labels(conf("classes", select="list", labels=[3, 1, 4]), num_classes=10, num_images=5)
    assert ls.labels == (3, 1, 4)
    assert ls.for_indices(list(range(5))) == [3, 1, 4, 3, 1]


def test_labels_random():
    cfg = conf("classes", select="random", seed=5)
    a = load_labels(cfg, num_classes=1000, num_images=200)
    assert a == load_labels(cfg, num_classes=1000, num_images=200)
    assert len(a) == 200 and all(0 <= v < 1000 for v in a.labels)
    assert len(set(a.labels)) > 150
    b = load_labels(conf("classes", select="random", seed=6), num_classes=1000, num_images=200)
    assert a.labels != b.labels and a.fingerprint() != b.fingerprint()
    longer = load_labels(cfg, num_classes=1000, num_images=500)
    assert longer.labels[:200] == a.labels  # label i does not depend on num_images
    small = load_labels(conf("classes", select="random"), num_classes=3, num_images=300)
    assert set(small.labels) == {0, 1, 2}


def test_labels_errors():
    with pytest.raises(UsageError, match=r"prompts.select=some"):
        load_labels(conf("classes", select="some"), num_classes=10, num_images=5)
    with pytest.raises(UsageError, match=r"prompts.labels="):
        load_labels(conf("classes", select="list"), num_classes=10, num_images=5)
    with pytest.raises(UsageError, match=r"prompts.labels has 10.*0\.\.9"):
        load_labels(conf("classes", select="list", labels=[1, 10]), num_classes=10, num_images=5)
    with pytest.raises(UsageError, match=r"prompts.labels has -1"):
        load_labels(conf("classes", select="list", labels=[-1]), num_classes=10, num_images=5)
    with pytest.raises(UsageError, match=r"prompts.labels has 'a'"):
        load_labels(conf("classes", select="list", labels=["a"]), num_classes=10, num_images=5)
    with pytest.raises(UsageError, match=r"prompts.seed="):
        load_labels(conf("classes", select="random", seed=-2), num_classes=10, num_images=5)


# --- fingerprints ------------------------------------------------------------------------------------


def test_fingerprint():
    base = PromptSet("file", ("a cat", "a dog"), ("f:0", "f:1"), "file:a.txt")
    fp = base.fingerprint()
    assert len(fp) == 16 and int(fp, 16) >= 0
    assert PromptSet("file", ("a cat", "a dog"), ("f:0", "f:1"), "file:b.txt").fingerprint() == fp
    assert PromptSet("file", ("a cat", "a fox"), ("f:0", "f:1"), "file:a.txt").fingerprint() != fp
    assert PromptSet("file", ("a cat", "a dog"), ("f:0", "f:2"), "file:a.txt").fingerprint() != fp
    assert PromptSet("coco", ("a cat", "a dog"), ("f:0", "f:1"), "file:a.txt").fingerprint() != fp
    # no ambiguity from concatenation
    assert PromptSet("file", ("a ca", "ta dog"), ("f:0", "f:1"), "x").fingerprint() != fp
    assert LabelSet((1, 2), "x").fingerprint() != LabelSet((2, 1), "x").fingerprint()
    assert LabelSet((1, 2), "x").fingerprint() == LabelSet((1, 2), "y").fingerprint()


def test_file_fingerprint_follows_content(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("a cat\na dog\n")
    fp = load_prompts({"kind": "file", "path": str(path)}, num_images=2).fingerprint()
    path.write_text("a cat\na dog, photograph\n")
    assert load_prompts({"kind": "file", "path": str(path)}, num_images=2).fingerprint() != fp
