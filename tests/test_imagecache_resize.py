"""Resize modes (crop | pad | squash): one function for training and inference, the model's own mode."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from lightclip.config import ModelConfig, PretrainConfig, TrainConfig
from lightclip.imagecache import ImageCacheError, build_image_cache, cache_key, decode_image, fit_image, resize_mode_of
from lightclip.models.ensemble import EnsembleCLIP
from lightclip.models.zoo import ModelError, ModelSpec, create_model, load_model, preprocess_config, save_model, tokenizer
from lightclip.pretrain import PretrainInputs, PretrainOutputs, run_pretrain
from lightclip.serving import Embedder
from lightclip.stage import StageContext
from lightclip.tasks import ImageTextTask, PairSet
from lightclip.training import checkpoint_key

RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)


def _old_decode(path: Path | io.BytesIO, image_size: int) -> np.ndarray:
    """The decoder before resize modes existed (verbatim): shortest side -> S, bicubic, centre crop."""
    with Image.open(path) as img:
        img.draft("RGB", (image_size, image_size))
        img = img.convert("RGB")
        w, h = img.size
        scale = image_size / min(w, h)
        new_w, new_h = max(image_size, round(w * scale)), max(image_size, round(h * scale))
        if (new_w, new_h) != (w, h):
            img = img.resize((new_w, new_h), Image.Resampling.BICUBIC)
        left, top = (new_w - image_size) // 2, (new_h - image_size) // 2
        img = img.crop((left, top, left + image_size, top + image_size))
        return np.asarray(img, dtype=np.uint8).transpose(2, 0, 1)


def _photo(width: int, height: int, fmt: str, seed: int) -> io.BytesIO:
    """A noisy image with shapes: any change in resampling shows in its pixels."""
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8))
    ImageDraw.Draw(image).ellipse([width // 5, height // 6, width // 2, height // 2], fill=(20, 200, 90))
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    buffer.seek(0)
    return buffer


@pytest.mark.parametrize("width,height,fmt,size", [(60, 80, "PNG", 32), (600, 800, "JPEG", 64), (224, 224, "JPEG", 32), (81, 47, "PNG", 32),
                                                   (1000, 1333, "JPEG", 224), (20, 30, "PNG", 32)])
def test_crop_is_bit_identical_to_the_decoder_before_modes(width, height, fmt, size):
    data = _photo(width, height, fmt, seed=width).getvalue()
    assert np.array_equal(decode_image(io.BytesIO(data), size), _old_decode(io.BytesIO(data), size))
    assert np.array_equal(decode_image(io.BytesIO(data), size, resize_mode="crop"), _old_decode(io.BytesIO(data), size))


def test_pad_fits_a_60x80_portrait_whole_between_white_borders():
    fitted = np.asarray(fit_image(Image.new("RGB", (60, 80), (200, 30, 40)), 32, "pad"))
    assert fitted.shape == (32, 32, 3)
    # longest side 80 -> 32: the image is 24 x 32, centred: 4 white columns each side
    assert (fitted[:, :4] == WHITE).all() and (fitted[:, 28:] == WHITE).all()
    assert (fitted[:, 4:28] == (200, 30, 40)).all()
    landscape = np.asarray(fit_image(Image.new("RGB", (80, 60), (200, 30, 40)), 32, "pad"))
    assert (landscape[:4] == WHITE).all() and (landscape[28:] == WHITE).all() and (landscape[4:28] == (200, 30, 40)).all()


def test_pad_and_squash_of_a_tiny_3_4_portrait():
    portrait = Image.new("RGB", (3, 4), (10, 20, 30))
    padded = np.asarray(fit_image(portrait, 8, "pad"))[:, :, 0]
    assert padded.tolist() == [[255, 10, 10, 10, 10, 10, 10, 255]] * 8  # 3x4 -> 6x8, one white column each side
    assert (np.asarray(fit_image(portrait, 8, "squash")) == (10, 20, 30)).all()  # stretched to fill the square


def test_squash_keeps_the_top_and_bottom_that_crop_cuts():
    image = Image.new("RGB", (60, 80), RED)
    image.paste(BLUE, (0, 40, 60, 80))  # top half red, bottom half blue
    band = Image.new("RGB", (60, 80), WHITE)
    band.paste(RED, (0, 8, 60, 80))  # an 8-row white band at the top of a portrait
    squashed = np.asarray(fit_image(image, 32, "squash"))
    assert (squashed[:15] == RED).all() and (squashed[17:] == BLUE).all()  # half and half, both rows 15-16 blended
    assert squashed[15, 0].tolist() == [236, 0, 19] and squashed[16, 0].tolist() == [19, 0, 236]
    assert not (np.asarray(fit_image(band, 32, "crop"))[0] == WHITE).all()  # crop cuts the band (5 of 43 rows)
    assert (np.asarray(fit_image(band, 32, "squash"))[:2] == WHITE).all()
    assert (np.asarray(fit_image(band, 32, "pad"))[:2, 4:28] == WHITE).all()


def test_an_unknown_mode_is_an_error():
    with pytest.raises(ImageCacheError, match="unknown resize mode 'stretch'"):
        decode_image(_photo(10, 10, "PNG", 0), 8, resize_mode="stretch")
    with pytest.raises(ImageCacheError, match="unknown resize_mode 'stretch'"):
        resize_mode_of({"resize_mode": "stretch"})
    assert [resize_mode_of({"resize_mode": m}) for m in ("shortest", "longest", "squash", "crop")] == ["crop", "pad", "squash", "crop"]
    assert resize_mode_of({}) == "crop"


def test_each_mode_has_its_own_cache_and_crop_keeps_its_old_key(tiny_catalogue, tmp_path):
    cat = tiny_catalogue(4)
    crop = build_image_cache(cat, None, 32, tmp_path / "cache", progress=False)
    pad = build_image_cache(cat, None, 32, tmp_path / "cache", progress=False, resize_mode="pad")
    assert crop.path.name.startswith("all-32px-") and pad.path.name.startswith("all-32px-pad-")
    assert crop.path.is_file() and pad.path.is_file() and crop.key != pad.key
    assert (crop.resize_mode, pad.resize_mode) == ("crop", "pad")
    paths = cat.image_paths()
    assert crop.key == cache_key(crop.ids, paths, 32)  # the crop cache hashes as before modes existed
    again = build_image_cache(cat, None, 32, tmp_path / "cache", progress=False, resize_mode="pad")
    assert again.reused and again.resize_mode == "pad"
    assert np.array_equal(pad.images[1], decode_image(paths[1], 32, resize_mode="pad"))


def test_the_mode_is_the_models_own_from_spec_to_model_json_to_serving(tmp_path):
    assert ModelConfig().resize_mode == "crop"
    crop_model, _ = create_model(ModelSpec(arch="lc-test-tiny"), seed=0)
    pad_model, _ = create_model(ModelSpec(arch="lc-test-tiny", resize_mode="pad"), seed=0)
    save_model(crop_model, "lc-test-tiny", tmp_path / "crop")
    save_model(pad_model, "lc-test-tiny", tmp_path / "pad")
    crop_info = json.loads((tmp_path / "crop" / "model.json").read_text())
    pad_info = json.loads((tmp_path / "pad" / "model.json").read_text())
    assert crop_info["image"]["resize_mode"] == "shortest"  # as before: a crop model's model.json is unchanged
    assert pad_info["image"]["resize_mode"] == "longest"  # open_clip's name for it
    assert resize_mode_of(preprocess_config(load_model(tmp_path / "pad"))) == "pad"
    portrait = io.BytesIO()
    Image.new("RGB", (60, 80), (200, 30, 40)).save(portrait, format="PNG")
    served = Embedder(tmp_path / "pad").decode(portrait.getvalue())
    assert served.shape == (3, 32, 32) and (served[:, :, :4] == 255).all()  # served padded, as trained


def test_training_refuses_images_fitted_another_way(tiny_catalogue, tmp_path):
    cat = tiny_catalogue(8)
    model, _ = create_model(ModelSpec(arch="lc-test-tiny", resize_mode="squash"), seed=0)
    items = cat.items.copy()
    items["split"] = "train"
    cat = cat.with_items(items).save()
    cropped = PairSet.from_catalogue(cat, "train", 32, tmp_path / "cache", progress=False)
    with pytest.raises(ValueError, match="fitted by 'crop' but the model's resize_mode is 'squash'"):
        ImageTextTask(model, tokenizer("lc-test-tiny"), cropped, None)
    squashed = PairSet.from_catalogue(cat, "train", 32, tmp_path / "cache", progress=False, resize_mode="squash")
    assert ImageTextTask(model, tokenizer("lc-test-tiny"), squashed, None).resize_mode == "squash"


def test_a_crop_trajectory_keeps_its_checkpoint_key():
    before = {"model": {"arch": "lc-vit-t", "pretrained": None}, "train": {"lr": 0.1}}
    crop = {"model": {"arch": "lc-vit-t", "pretrained": None, "resize_mode": "crop"}, "train": {"lr": 0.1}}
    pad = {"model": {"arch": "lc-vit-t", "pretrained": None, "resize_mode": "pad"}, "train": {"lr": 0.1}}
    assert checkpoint_key(crop, "cat") == checkpoint_key(before, "cat") != checkpoint_key(pad, "cat")


def test_ensemble_members_must_share_the_resize_mode():
    crop, _ = create_model(ModelSpec(arch="lc-test-tiny"), seed=0)
    pad, _ = create_model(ModelSpec(arch="lc-test-tiny", resize_mode="pad"), seed=1)
    with pytest.raises(ModelError, match=r"resize_mode: \['longest'\] vs \['shortest'\]"):
        EnsembleCLIP([crop, pad])
    assert resize_mode_of(preprocess_config(EnsembleCLIP([pad, pad]))) == "pad"


def test_a_trained_teacher_records_its_mode_and_training_geometry(tiny_catalogue, tmp_path):
    cat = tiny_catalogue(24)  # 48 x 48 squares
    for i in range(0, 24, 3):  # a third of them 3:4 portraits
        Image.new("RGB", (60, 80), (i * 9, 90, 90)).save(cat.root / "images" / f"{i}.png")
    items = cat.items.copy()
    items["split"] = ["train"] * 16 + ["val"] * 4 + ["test"] * 4
    cat = cat.with_items(items).save()
    config = PretrainConfig(
        model=ModelConfig(arch="lc-test-tiny", resize_mode="pad"),
        train=TrainConfig(epochs=1, batch_size=8, warmup_steps=0, early_stop_patience=0, num_threads=1),
        concept_weight=0.0,
        ensemble_members=1,
    )
    outputs = PretrainOutputs(model=tmp_path / "teacher", metrics=tmp_path / "teacher.json")
    run_pretrain(config, PretrainInputs(catalogue=cat.root, kg=None), outputs, StageContext(project_dir=tmp_path, progress=False))
    info = json.loads((tmp_path / "teacher" / "model.json").read_text())
    assert info["image"]["resize_mode"] == "longest"
    geometry = info["extra"]["train_geometry"]
    assert geometry["images"] == 16 and geometry["buckets"]["portrait 3:4 (0.70-0.90)"] == 6 and geometry["buckets"]["square (0.90-1.11)"] == 10
    assert [p.name.startswith("train-32px-pad-") for p in (tmp_path / ".cache" / "images").glob("train-*.npy")] == [True]
