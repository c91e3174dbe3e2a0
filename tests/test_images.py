"""Bad input: every case of the issue, at the decoder, at ingest (skip / fail) and in the shard stage."""

from __future__ import annotations

import io
import json
import tarfile
import unicodedata
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stages.shard import shard
from stages.workspace import images
from stages.workspace.common import DataError
from stages.workspace.ingest import ingest
from support.data_utils import encode, light_workspace, noise_rgb, read_shards, set_params

# torchvision 0.29 (pinned) warns that its image codecs will move to TorchCodec; the loader copes without them
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities:DeprecationWarning")

MAX_PIXELS = 1_000_000


def decode(data: bytes, mode: str = "RGB") -> images.Decoded:
    return images.decode(data, mode=mode, max_pixels=MAX_PIXELS)


# ------------------------------------------------------------------------------------- refused files
JPEG = encode(noise_rgb(0, 32), "JPEG", quality=90)
PNG = encode(noise_rgb(1, 32), "PNG")

REFUSED = {
    "zero-byte": (b"", "empty file"),
    "truncated jpeg": (JPEG[: len(JPEG) // 2], "truncated"),
    "truncated png": (PNG[: len(PNG) // 2], "truncated"),
    "text with an image extension": (b"name,label\ncat,1\n", "not an image"),
    "html error page saved as .jpg": (b"<html><body>404 Not Found</body></html>", "not an image"),
    "float image (mode F)": (encode(Image.fromarray(np.ones((4, 4), np.float32)), "TIFF"), "mode F"),
    "decompression bomb (header over the limit)": (encode(Image.new("L", (1500, 1000)), "PNG"), "decompression bomb"),
    "decompression bomb (over twice the limit)": (encode(Image.new("L", (4000, 1000)), "PNG"), "decompression bomb"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_unusable_images_are_refused_with_a_reason(case):
    data, reason = REFUSED[case]
    with pytest.raises(images.BadImage, match=reason) as err:
        decode(data)
    assert "\n" not in str(err.value)


def test_bomb_is_refused_before_its_pixels_are_decoded(monkeypatch):
    from PIL import ImageFile

    bomb = encode(Image.new("L", (1200, 1000)), "PNG")
    loaded = []
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: loaded.append(self))
    with pytest.raises(images.BadImage, match="decompression bomb"):
        images.decode(bomb, mode="L", max_pixels=MAX_PIXELS)
    assert not loaded
    images.decode(encode(Image.new("L", (10, 10)), "PNG"), mode="L", max_pixels=MAX_PIXELS)
    assert loaded  # the patch does see a normal image being decoded


# ----------------------------------------------------------------------------------- converted files
def test_cmyk_is_converted_to_rgb_and_grey():
    red = encode(Image.new("RGB", (8, 8), (255, 0, 0)).convert("CMYK"), "JPEG", quality=95)
    d = decode(red, "RGB")
    assert d.source_mode == "CMYK" and d.image.mode == "RGB" and "CMYK" in d.conversion
    r, g, b = d.image.getpixel((4, 4))
    assert r > 240 and g < 15 and b < 15
    assert decode(red, "L").image.mode == "L"


def test_16_bit_grey_is_scaled_not_clipped():
    values = np.array([[0, 257, 32768, 65535]], dtype=np.uint16)  # Pillow's own convert would clip to 255
    d = decode(encode(Image.fromarray(values), "PNG"), "L")
    assert d.source_mode.startswith("I") and "scaled to 8 bits" in d.conversion
    assert np.asarray(d.image).tolist() == [[0, 1, 128, 255]]


def test_palette_without_transparency_keeps_its_colours():
    img = noise_rgb(2, 8).convert("P")
    d = decode(encode(img, "PNG"), "RGB")
    assert d.source_mode == "P" and np.array_equal(np.asarray(d.image), np.asarray(img.convert("RGB")))


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P-with-transparency"])
def test_alpha_is_composited_on_white(mode):
    if mode == "P-with-transparency":
        img = Image.new("RGB", (4, 4), (0, 0, 0)).convert("P")
        data = encode(img, "PNG", transparency=0)
    else:
        img = Image.new(mode, (4, 4), (0, 0, 0, 0) if mode == "RGBA" else (0, 0))
        img.putpixel((1, 1), (200, 10, 10, 255) if mode == "RGBA" else (50, 255))  # one opaque pixel
        data = encode(img, "PNG")
    d = decode(data, "RGB")
    assert "alpha composited on white" in d.conversion
    assert d.image.getpixel((0, 0)) == (255, 255, 255)  # transparent -> white, not black
    if mode == "RGBA":
        assert d.image.getpixel((1, 1)) == (200, 10, 10)  # opaque pixels unchanged
    if mode == "LA":
        assert d.image.getpixel((1, 1)) == (50, 50, 50)


def test_plain_image_needs_no_conversion():
    d = decode(PNG, "RGB")
    assert d.conversion is None and d.source_format == "PNG"
    assert decode(PNG, "L").conversion == "-> L"


def test_names_with_control_characters_are_refused_and_unicode_is_normalised():
    nfd = unicodedata.normalize("NFD", "chat é.png")
    assert images.normalise_name(nfd) == unicodedata.normalize("NFC", "chat é.png")
    with pytest.raises(images.BadImage, match="control characters"):
        images.normalise_name("bad\nname.png")


# -------------------------------------------------------------------------------- ingest and shard
def _messy_folder(root: Path) -> dict[str, str]:
    """A labelled folder with good, convertible and unusable files; returns {unusable path: reason}."""
    good = {
        "cat/plain.jpg": JPEG,
        "cat/with space ü.png": PNG,  # spaces + unicode (NFC)
        "cat/" + unicodedata.normalize("NFD", "café.png"): encode(noise_rgb(3), "PNG"),  # NFD name
        "cat/cmyk.jpg": encode(noise_rgb(4).convert("CMYK"), "JPEG"),
        "cat/sixteen.png": encode(Image.fromarray((np.arange(256, dtype=np.uint16) * 250).reshape(16, 16)), "PNG"),
        "dog/palette.png": encode(noise_rgb(5).convert("P"), "PNG"),
        "dog/alpha.png": encode(Image.new("RGBA", (16, 16), (0, 0, 0, 0)), "PNG"),
        "dog/grey.png": encode(noise_rgb(6).convert("L"), "PNG"),
        "dog/more.jpg": encode(noise_rgb(7), "JPEG"),
        "dog/notes.txt": b"ignored: not an image extension",
    }
    bad = {
        "cat/empty.jpg": (b"", "empty file"),
        "cat/truncated.jpg": (JPEG[:300], "truncated"),
        "dog/truncated.png": (PNG[:200], "truncated"),
        "dog/fake.png": (b"GIF89 but not really", "not an image"),
        "dog/bomb.png": (encode(Image.new("L", (1500, 1000)), "PNG"), "decompression bomb"),
    }
    for rel, data in {**good, **{k: v[0] for k, v in bad.items()}}.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return {rel: reason for rel, (_, reason) in bad.items()}


def test_ingest_skips_unusable_files_listing_each_reason_and_shard_converts_the_rest(tmp_path):
    src = tmp_path / "messy"
    bad = _messy_folder(src)
    # the messy folder mixes 16 and 32 px images: one shard size makes a split batchable (else it is refused)
    ws = light_workspace(
        tmp_path / "ws",
        data__on_bad_image="skip",
        data__image_mode="RGB",
        data__max_image_pixels=MAX_PIXELS,
        shard__image_format="png",
        shard__image_size=16,
    )
    result = ingest("folder", src, run_dvc=False, root=ws)
    skipped = {entry["path"].split(":", 1)[1]: entry["reason"] for entry in result.skipped}
    assert set(skipped) == set(bad)
    for rel, reason in bad.items():
        assert reason in skipped[rel]
    raw = ws / "data" / "raw"
    assert not any(raw.rglob("empty.jpg")) and not any(raw.rglob("notes.txt"))
    names = {p.name for p in raw.rglob("*.*")}
    assert unicodedata.normalize("NFC", "café.png") in names and "with space ü.png" in names
    source = json.loads((raw / "SOURCE.json").read_text())
    assert source["ignored"]["count"] == 1 and len(source["skipped"]) == len(bad)

    manifest = shard(ws)
    assert manifest["skipped_count"] == 0 and len(manifest["skipped_at_ingest"]) == len(bad)
    conversions = " | ".join(manifest["conversions"])
    for what in ("CMYK -> RGB", "I;16 scaled to 8 bits", "P -> RGB", "RGBA alpha composited on white", "-> RGB"):
        assert what in conversions
    samples = [s for split in manifest["splits"] for s in read_shards(ws / "data" / "shards", split)]
    assert len(samples) == 9 and all(Image.open(io.BytesIO(s["png"])).mode == "RGB" for s in samples)
    paths = {json.loads(s["json"])["path"] for s in samples}
    assert any(p.endswith("with space ü.png") for p in paths)


def test_fail_policy_stops_at_the_first_bad_file_and_writes_nothing(tmp_path):
    src = tmp_path / "messy"
    _messy_folder(src)
    ws = light_workspace(tmp_path / "ws", data__on_bad_image="fail", data__max_image_pixels=MAX_PIXELS)
    with pytest.raises(DataError, match=r"folder:cat/\S+: .*on_bad_image is 'fail'") as err:
        ingest("folder", src, run_dvc=False, root=ws)
    assert "\n" not in str(err.value)
    assert not (ws / "data").exists() or not any((ws / "data").iterdir())


def test_shard_stage_applies_the_policy_to_files_dropped_into_raw(tmp_path):
    src = tmp_path / "clean"
    for i, cls in enumerate(["a", "a", "b", "b"]):
        (src / "train" / cls).mkdir(parents=True, exist_ok=True)
        (src / "train" / cls / f"{i}.png").write_bytes(encode(noise_rgb(i), "PNG"))
        (src / "test" / cls).mkdir(parents=True, exist_ok=True)
        (src / "test" / cls / f"{i}.png").write_bytes(encode(noise_rgb(10 + i), "PNG"))
    ws = light_workspace(tmp_path / "ws", data__on_bad_image="skip")
    ingest("folder", src, run_dvc=False, root=ws)
    (ws / "data" / "raw" / "train" / "a" / "dropped.jpg").write_bytes(JPEG[:250])

    manifest = shard(ws)  # skip: listed and counted
    assert [e["path"] for e in manifest["skipped"]] == ["data/raw/train/a/dropped.jpg"]
    assert "truncated" in manifest["skipped"][0]["reason"] and manifest["skipped_count"] == 1
    assert manifest["splits"]["train"]["count"] == 4
    assert manifest["data_dvc"]["matches"] is False  # data/raw is no longer what was versioned
    shards = ws / "data" / "shards"
    before = {p.name: p.read_bytes() for p in shards.iterdir()}

    set_params(ws, data__on_bad_image="fail")
    with pytest.raises(DataError, match=r"data/raw/train/a/dropped.jpg: truncated"):
        shard(ws)
    # nothing written: data/shards is still exactly the previous run's, and no temp folder is left behind
    assert {p.name: p.read_bytes() for p in shards.iterdir()} == before
    assert sorted(p.name for p in (ws / "data").iterdir()) == ["raw", "shards"]


# ----------------------------------------------------------------------------------- archive tricks
def _tar_with(tmp_path: Path, member: tarfile.TarInfo, data: bytes | None = None) -> Path:
    path = tmp_path / "tricky.tar.gz"
    with tarfile.open(path, "w:gz") as tf:
        ok = tarfile.TarInfo("set/cat/ok.png")
        ok.size = len(PNG)
        tf.addfile(ok, io.BytesIO(PNG))
        tf.addfile(member, io.BytesIO(data) if data is not None else None)
    return path


def _tar_member(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    if kind == tarfile.REGTYPE:
        info.size = len(PNG)
    return info


TAR_TRICKS = {
    "absolute path": (_tar_member("/etc/cron.d/evil.png"), "absolute path"),
    "dot-dot": (_tar_member("set/../../evil.png"), r"'\.\.'"),
    "symlink": (_tar_member("set/cat/link.png", tarfile.SYMTYPE, "/etc/passwd"), "symlink"),
    "hardlink": (_tar_member("set/cat/hard.png", tarfile.LNKTYPE, "set/cat/ok.png"), "hardlink"),
    "device": (_tar_member("set/cat/dev.png", tarfile.CHRTYPE), "special file"),
}


@pytest.mark.parametrize("policy", ["skip", "fail"])
@pytest.mark.parametrize("trick", list(TAR_TRICKS))
def test_tar_path_tricks_are_always_refused(tmp_path, trick, policy):
    member, why = TAR_TRICKS[trick]
    archive = _tar_with(tmp_path, member, PNG if member.isreg() else None)
    ws = light_workspace(tmp_path / "ws", data__on_bad_image=policy)
    with pytest.raises(DataError, match=f"tricky.tar.gz: member .*{why}.*refusing the archive"):
        ingest("archive", archive, run_dvc=False, root=ws)
    assert not (ws / "data" / "raw").exists()
    assert not (tmp_path.parent / "evil.png").exists() and not (tmp_path / "evil.png").exists()


@pytest.mark.parametrize("trick", ["../evil.png", "/abs/evil.png", "C:/evil.png", "set\\..\\evil.png", "symlink"])
def test_zip_path_tricks_are_always_refused(tmp_path, trick):
    archive = tmp_path / "tricky.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("set/cat/ok.png", PNG)
        if trick == "symlink":
            info = zipfile.ZipInfo("set/cat/link.png")
            info.external_attr = 0o120777 << 16
            zf.writestr(info, "/etc/passwd")
        else:
            zf.writestr(zipfile.ZipInfo(trick), PNG)
    ws = light_workspace(tmp_path / "ws", data__on_bad_image="skip")
    with pytest.raises(DataError, match="tricky.zip: member .*refusing the archive"):
        ingest("archive", archive, run_dvc=False, root=ws)
    assert not (ws / "data" / "raw").exists()
