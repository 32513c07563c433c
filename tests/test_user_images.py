"""Real users' image files (issue 12): unreadable files found at setup, hidden files, image modes and EXIF
orientation, and prediction inputs of the wrong kind."""

import json

import numpy as np
import pytest
from PIL import Image

from conftest import tiny_config, write_config
from test_user_files import assert_bad_input, cli_run
from graft.data import open_image
from graft.plugins.imagefolder import list_images


def image_folder(root, per_class=6):
    rng = np.random.default_rng(0)
    for c, name in enumerate(("cat", "dog")):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            x = rng.integers(0, 80, (8, 8, 3)) + 150 * c
            Image.fromarray(x.astype(np.uint8)).save(root / name / f"{i}.png")
    return root


def add_bad_files(root):
    buf = root / "cat" / "whole.jpg"
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3)).astype(np.uint8)).save(buf, quality=90)
    data = buf.read_bytes()
    buf.unlink()
    (root / "cat" / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (root / "dog" / "empty.png").write_bytes(b"")
    (root / "dog" / "notes.jpg").write_text("not an image\n")
    png = (root / "dog" / "0.png").read_bytes()
    (root / "dog" / "cut.png").write_bytes(png[: len(png) - 20])
    return {"truncated.jpg", "empty.png", "notes.jpg", "cut.png"}


def folder_config(tmp_path, root, name="c.toml", **data):
    return write_config(tmp_path / name, tiny_config(data={"plugin": "imagefolder", "path": str(root), **data},
                                                     train={"max_steps": 2, "batch_size": 4}))


def test_unreadable_images_found_at_setup_listed_or_skipped(tmp_path):
    root = image_folder(tmp_path / "imgs")
    bad = add_bad_files(root)
    code, out = cli_run("train", folder_config(tmp_path, root), "--out", tmp_path / "r")
    assert_bad_input(code, out, "4 files", "cannot be read as images", "bad_files = \"skip\"", *sorted(bad)[:3])
    assert not (tmp_path / "r" / "checkpoints").exists()  # found before training started

    code, out = cli_run("train", folder_config(tmp_path, root, bad_files="skip"), "--out", tmp_path / "s")
    assert code == 0, out
    warnings = [line for line in out.splitlines() if line.startswith("Warning:")]
    assert len(warnings) == 1 and "skipping 4 unreadable image files" in warnings[0]
    skipped = json.loads((tmp_path / "s" / "data.json").read_text())["skipped_files"]
    assert sorted(p.rsplit("/", 1)[1] for p in skipped) == sorted(bad)
    assert json.loads((tmp_path / "s" / "summary.json").read_text())["data"]["skipped_files"] == skipped


def test_hidden_files_and_folders_are_never_examples_or_classes(tmp_path):
    root = image_folder(tmp_path / "imgs")
    (root / ".thumbnails").mkdir()
    Image.new("RGB", (8, 8)).save(root / ".thumbnails" / "a.png")
    (root / "cat" / "._0.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble junk")
    (root / "dog" / ".ipynb_checkpoints").mkdir()
    Image.new("RGB", (8, 8)).save(root / "dog" / ".ipynb_checkpoints" / "x.png")
    items = list_images(root)
    assert {label for _, label in items} == {"cat", "dog"} and len(items) == 12
    code, out = cli_run("train", folder_config(tmp_path, root), "--out", tmp_path / "r")
    assert code == 0, out


def test_image_modes_reach_the_model_as_rgb(tmp_path):
    def roundtrip(im, name="x.png", **save):
        im.save(tmp_path / name, **save)
        return np.asarray(open_image(tmp_path / name))

    rgba = Image.new("RGBA", (2, 1))
    rgba.putpixel((0, 0), (255, 0, 0, 0))  # fully transparent red: white, not black or red
    rgba.putpixel((1, 0), (0, 0, 0, 255))
    assert roundtrip(rgba).tolist() == [[[255, 255, 255], [0, 0, 0]]]
    la = Image.new("LA", (1, 1), (0, 0))
    assert roundtrip(la).tolist() == [[[255, 255, 255]]]
    pal = Image.new("P", (2, 1))
    pal.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    pal.putpixel((1, 0), 1)
    assert roundtrip(pal).tolist() == [[[0, 0, 0], [10, 200, 30]]]
    assert roundtrip(pal, "t.png", transparency=0).tolist() == [[[255, 255, 255], [10, 200, 30]]]
    cmyk = Image.new("CMYK", (1, 1), (0, 255, 255, 0))
    assert roundtrip(cmyk, "c.jpg", quality=100)[0, 0].tolist() == pytest.approx([255, 0, 0], abs=3)
    sixteen = Image.fromarray(np.array([[0, 65535, 32768, 1028]], dtype=np.uint16))
    assert roundtrip(sixteen)[0, :, 0].tolist() == [0, 255, 128, 4]  # scaled, not clipped to white
    grey = Image.fromarray(np.array([[0, 77, 255]], dtype=np.uint8))
    assert roundtrip(grey)[0].tolist() == [[0, 0, 0], [77, 77, 77], [255, 255, 255]]


def sideways(tmp_path):
    """An asymmetric picture, and the same stored rotated with EXIF orientation 6 (how phones save portraits)."""
    upright = Image.fromarray(np.random.default_rng(3).integers(0, 255, (6, 10, 3)).astype(np.uint8))
    upright.save(tmp_path / "upright.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise
    upright.transpose(Image.Transpose.ROTATE_90).save(tmp_path / "phone.png", exif=exif)
    return upright


def test_exif_orientation_applied_in_training_and_predict(tmp_path):
    upright = sideways(tmp_path)
    assert np.array_equal(np.asarray(open_image(tmp_path / "phone.png")), np.asarray(upright))
    root = image_folder(tmp_path / "imgs")
    cfg = write_config(tmp_path / "c.toml", tiny_config(
        backbone={"plugin": "timm", "model": "test_resnet"},
        data={"plugin": "imagefolder", "path": str(root), "image_size": 16}, train={"max_steps": 2}))
    code, out = cli_run("train", cfg, "--out", tmp_path / "run")
    assert code == 0, out
    code, out = cli_run("predict", tmp_path / "run", tmp_path / "upright.png", tmp_path / "phone.png", "--json")
    assert code == 0, out
    a, b = (json.loads(line) for line in out.splitlines() if line.startswith("{"))
    assert a["top"] == b["top"]


def test_prediction_inputs_of_the_wrong_kind(tmp_path):
    root = image_folder(tmp_path / "imgs")
    code, out = cli_run("train", folder_config(tmp_path, root), "--out", tmp_path / "run")
    assert code == 0, out
    (tmp_path / "words.txt").write_text("a text file, not an image\n")
    assert_bad_input(*cli_run("predict", tmp_path / "run", tmp_path / "words.txt"), "words.txt",
                     "cannot be read as an image")
    assert_bad_input(*cli_run("predict", tmp_path / "run", tmp_path / "missing.png"), "missing.png", "no such file")
    assert_bad_input(*cli_run("predict", tmp_path / "run", root), "is a folder")
    digits_run = write_config(tmp_path / "d.toml", tiny_config(train={"max_steps": 1}))
    assert cli_run("train", digits_run, "--out", tmp_path / "d")[0] == 0
    assert_bad_input(*cli_run("predict", tmp_path / "d", "seven"), "seven", "no such file")
    assert_bad_input(*cli_run("eval", tmp_path / "run", "--data", f"path={tmp_path / 'words.txt'}"),
                     "words.txt", "is not a folder")
