"""Tiny fixture datasets in the layouts of the real archives, and the image helpers behind them."""
import pathlib
import signal
import struct
import zipfile

import cv2
import numpy as np
import scipy.io
from PIL import Image

H, W = 40, 30  # portrait-shaped photos: 30 wide, 40 tall


def photo(seed: int, h: int = H, w: int = W) -> np.ndarray:
    """A smooth random RGB uint8 photo (smooth, so that JPEG keeps it recognisable)."""
    noise = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    return cv2.GaussianBlur(noise, (5, 5), 0)


def person(seed: int, h: int = H, w: int = W) -> np.ndarray:
    """A 0/1 uint8 mask: an ellipse placed by SEED."""
    mask = np.zeros((h, w), np.uint8)
    rng = np.random.default_rng(seed)
    centre = (int(rng.integers(w // 3, 2 * w // 3)), int(rng.integers(h // 3, 2 * h // 3)))
    cv2.ellipse(mask, centre, (w // 4, h // 3), 0, 0, 360, 1, -1)
    return mask


def mean_centre_shift(resize, size: tuple[int, int], seed: int, count: int = 20) -> np.ndarray:
    """Mean (row, column) offset, in output pixels, of the centre of mass of RESIZE(mask) from an
    area-resized (exact) copy's, over COUNT rectangles in 450x600 masks resized to SIZE (h, w)."""
    rng = np.random.default_rng(seed)
    height, width = size
    grid = np.mgrid[:height, :width].reshape(2, -1)
    shifts = []
    for _ in range(count):
        mask = np.zeros((450, 600), np.uint8)
        top, left = rng.integers(20, 200), rng.integers(20, 300)
        mask[top:top + rng.integers(60, 200), left:left + rng.integers(60, 250)] = 1
        resized = np.asarray(resize(mask)).reshape(height, width)
        exact = cv2.resize(mask.astype(np.float32), (width, height), interpolation=cv2.INTER_AREA)
        shifts.append(grid @ resized.ravel() / resized.sum() - grid @ exact.ravel() / exact.sum())
    return np.mean(shifts, axis=0)


def write(path: pathlib.Path, rgb_or_gray: np.ndarray) -> pathlib.Path:
    """Write an RGB (or gray, or RGBA) array with OpenCV, format from the suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    array = rgb_or_gray
    if array.ndim == 3:
        array = cv2.cvtColor(array, cv2.COLOR_RGB2BGR if array.shape[2] == 3 else cv2.COLOR_RGBA2BGRA)
    assert cv2.imwrite(str(path), array)
    return path


def write_exif_jpeg(path: pathlib.Path, stored_rgb: np.ndarray, orientation: int) -> pathlib.Path:
    """A JPEG of STORED_RGB tagged with EXIF ORIENTATION."""
    path.parent.mkdir(parents=True, exist_ok=True)
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(stored_rgb).save(path, "JPEG", quality=95, exif=exif.tobytes())
    return path


def wide_gamut_profile() -> bytes:
    """An ICC v2 RGB profile with Display P3's primaries (D50-adapted) and gamma 2.2: a photo
    tagged with it holds wider-gamut colours than the same numbers in sRGB."""
    def s15(v):
        return struct.pack(">i", round(v * 65536))

    def xyz(x, y, z):
        return b"XYZ " + b"\0" * 4 + s15(x) + s15(y) + s15(z)

    def desc(text):
        a = text.encode() + b"\0"
        return (b"desc" + b"\0" * 4 + struct.pack(">I", len(a)) + a + struct.pack(">II", 0, 0)
                + struct.pack(">HB", 0, 0) + b"\0" * 67)

    gamma = b"curv" + b"\0" * 4 + struct.pack(">IH", 1, round(2.2 * 256)) + b"\0\0"
    tags = [(b"desc", desc("Display P3 (test)")), (b"cprt", b"text" + b"\0" * 4 + b"none\0"),
            (b"wtpt", xyz(0.9642, 1.0, 0.8249)), (b"rXYZ", xyz(0.51512, 0.24120, -0.00105)),
            (b"gXYZ", xyz(0.29198, 0.69225, 0.04189)), (b"bXYZ", xyz(0.15710, 0.06657, 0.78407)),
            (b"rTRC", gamma), (b"gTRC", gamma), (b"bTRC", gamma)]
    table, data, offset = b"", b"", 128 + 4 + 12 * len(tags)
    for signature, body in tags:
        body += b"\0" * (-len(body) % 4)
        table += signature + struct.pack(">II", offset + len(data), len(body))
        data += body
    header = (struct.pack(">I", offset + len(data)) + b"\0" * 4 + struct.pack(">I", 0x02100000)
              + b"mntrRGB XYZ " + b"\0" * 12 + b"acsp" + b"\0" * 28 + s15(0.9642) + s15(1.0)
              + s15(0.8249) + b"\0" * 48)
    return header + struct.pack(">I", len(tags)) + table + data


def savemat(path: pathlib.Path, **variables) -> None:
    """Write VARIABLES to a MATLAB v5 file, as the real datasets ship them."""
    path.parent.mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(path, variables, do_compression=True)


def make_portraits(root: pathlib.Path) -> dict:
    """AutoPortraitMatting layout with each quirk; returns what a build must find."""
    data = root / "data"
    # By the stable hash, 16 and 30 fall in validation, the other train ids in train.
    train_list, test_list = [1, 2, 3, 4, 5, 6, 11, 30], [7, 8, 12]
    with_photo_and_mask = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 15, 16, 30]
    for i in with_photo_and_mask + [14]:
        rgb = photo(i)
        write(data / "images_data_crop" / f"{i:05d}.jpg", rgb.mean(axis=2).astype(np.uint8) if i == 5 else rgb)
    for i in with_photo_and_mask + [11, 13]:
        mask = np.zeros((H, W), np.uint8) if i == 15 else person(i)
        savemat(data / "images_mask" / f"{i:05d}_mask.mat", mask=mask)
    savemat(data / "trainlist.mat", trainlist=np.array([train_list], np.uint16))
    savemat(data / "testlist.mat", testlist=np.array([test_list], np.uint16))
    (root / "LICENSE").write_text("Apache-2.0\n")
    return {
        "test": {"00007", "00008"},
        "train+validation": {f"{i:05d}" for i in (1, 2, 3, 4, 5, 6, 9, 10, 16, 30)},
        "excluded": {
            "data/images_mask/00011_mask.mat": "mask without photo (id in trainlist)",
            "data/images_mask/00013_mask.mat": "mask without photo",
            "data/images_data_crop/00014.jpg": "photo without mask",
            "data/images_data_crop/00012.jpg": "in testlist but no photo and no mask",
            "data/images_mask/00015_mask.mat": "empty annotation (no person pixels)",
        },
        "counts": {"photos": 14, "masks": 15, "masks_without_photo": 2, "photos_without_mask": 1,
                   "listed_without_photo": {"train": 1, "test": 1}, "unlisted_photos": 4},
        "warnings": {"data/images_data_crop/00005.jpg": "L image converted to RGB"},
    }


def make_ccp(root: pathlib.Path) -> dict:
    """clothing-co-parsing layout: label maps, one empty, one photo and one annotation unpaired."""
    for i in range(1, 13):
        write(root / "photos" / f"{i:04d}.jpg", photo(100 + i))
        labels = person(100 + i) * np.random.default_rng(i).integers(1, 59, (H, W)).astype(np.uint8)
        savemat(root / "annotations" / "pixel-level" / f"{i:04d}.mat",
                groundtruth=np.zeros((H, W), np.uint8) if i == 5 else labels)
    write(root / "photos" / "0013.jpg", photo(113))
    savemat(root / "annotations" / "pixel-level" / "0014.mat", groundtruth=person(114))
    savemat(root / "label_list.mat", label_list=np.array([["null", "skin"]], dtype=object))
    return {
        "ids": {f"{i:04d}" for i in range(1, 13)} - {"0005"},
        "excluded": {
            "annotations/pixel-level/0005.mat": "empty annotation (no person pixels)",
            "photos/0013.jpg": "photo without pixel-level annotation",
            "annotations/pixel-level/0014.mat": "annotation without photo",
        },
    }


def zip_archive(source: pathlib.Path, archive_dir: str, zip_path: pathlib.Path) -> pathlib.Path:
    """Zip SOURCE's contents under ARCHIVE_DIR/, as GitHub's branch archives are laid out."""
    with zipfile.ZipFile(zip_path, "w") as archive:
        for f in sorted(source.rglob("*")):
            if f.is_file():
                archive.write(f, f"{archive_dir}/{f.relative_to(source).as_posix()}")
    return zip_path


def make_person_folder(root: pathlib.Path) -> dict:
    """images/ + masks/ with every good, convertible and bad case; returns the expected outcome."""
    images, masks = root / "images", root / "masks"
    images.mkdir(parents=True)
    masks.mkdir(parents=True)
    full = {}  # stem -> expected 0/1 mask in the displayed orientation

    def pair(stem: str, suffix: str, seed: int, mask_name: str | None = None) -> pathlib.Path:
        full[stem] = person(seed)
        write(masks / (mask_name or f"{stem}.png"), full[stem] * 255)
        return write(images / f"{stem}{suffix}", photo(seed))

    pair("good", ".jpg", 1)
    pair("suffix", ".jpeg", 2, mask_name="suffix_mask.png")
    pair("webp", ".webp", 3)
    pair("bitmap", ".bmp", 4)
    pair("gray", ".png", 5)
    write(images / "gray.png", photo(5)[..., 0])
    pair("rgba", ".png", 6)
    write(images / "rgba.png", np.dstack([photo(6), np.full((H, W), 128, np.uint8)]))
    pair("deep", ".png", 7)
    deep = photo(7).astype(np.uint16) * 256 + 255  # reduces to photo(7) exactly
    assert cv2.imwrite(str(images / "deep.png"), cv2.cvtColor(deep, cv2.COLOR_RGB2BGR))
    pair("palette", ".png", 8)
    Image.fromarray(photo(8)).convert("P").save(images / "palette.png")
    # EXIF orientation 6: the viewer turns the stored pixels 90 degrees clockwise.
    for stem, seed, mask in (("rotated", 9, person(9)), ("rotated_raw", 10, np.rot90(person(10), 1))):
        full[stem] = person(seed)
        write_exif_jpeg(images / f"{stem}.jpg", np.ascontiguousarray(np.rot90(photo(seed), 1)), 6)
        write(masks / f"{stem}.png", np.ascontiguousarray(mask) * 255)
    pair("small", ".jpg", 11)
    write(masks / "small.png", full["small"][::2, ::2] * 255)
    full["small"] = cv2.resize(full["small"][::2, ::2], (W, H), interpolation=cv2.INTER_NEAREST)
    pair("odd", ".jpg", 12)
    write(masks / "odd.png", full["odd"] * 200 + (1 - full["odd"]) * 40)
    pair("indexed", ".jpg", 13)
    palette_mask = Image.frombytes("P", (W, H), full["indexed"].tobytes())
    palette_mask.putpalette([0, 0, 0, 0, 0, 90])  # index 1 is a dark blue: read by index
    palette_mask.save(masks / "indexed.png")
    pair("empty", ".jpg", 14)
    full["empty"] = np.zeros((H, W), np.uint8)
    write(masks / "empty.png", full["empty"])

    # Bad cases.
    pair("aspect", ".jpg", 20)
    write(masks / "aspect.png", person(20, H, H) * 255)
    truncated = pair("truncated", ".jpg", 21)
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size * 6 // 10])
    truncated_png = pair("truncated_png", ".png", 22)
    truncated_png.write_bytes(truncated_png.read_bytes()[:-30])
    pair("corrupt", ".jpg", 23)
    (images / "corrupt.jpg").write_bytes(np.random.default_rng(0).bytes(500))
    pair("zero", ".jpg", 24)
    (images / "zero.jpg").write_bytes(b"")
    pair("zero_mask", ".jpg", 25)
    (masks / "zero_mask.png").write_bytes(b"")
    (images / "notes.txt").write_text("not a photo\n")
    write(images / "lonely.jpg", photo(26))
    write(masks / "orphan.png", person(27) * 255)
    pair("twin", ".jpg", 28)
    write(images / "twin.png", photo(28))
    for stem in ("aspect", "truncated", "truncated_png", "corrupt", "zero", "zero_mask", "twin"):
        del full[stem]

    return {
        "masks": full,
        "as_is": {"good", "suffix", "small", "odd", "indexed", "empty"},
        "warnings": {
            "images/gray.png": "L image converted to RGB",
            "images/rgba.png": "RGBA image converted to RGB",
            "images/deep.png": "16-bit image reduced to 8 bits",
            "images/palette.png": "P image converted to RGB",
            "images/rotated.jpg": "EXIF orientation 6 applied",
            "images/rotated_raw.jpg": "EXIF orientation 6 applied",
            "masks/rotated_raw.png": "mask follows the unrotated photo",
            "masks/small.png": "mask 15x20 resized to 30x40",
            "masks/odd.png": "mask values other than 0/1/255",
            "masks/empty.png": "empty mask (no person pixels)",
        },
        "skipped": {
            "masks/aspect.png": "different aspect ratio",
            "images/truncated.jpg": "truncated",
            "images/truncated_png.png": "not a readable image",
            "images/corrupt.jpg": "not an image (unknown or corrupt format)",
            "images/zero.jpg": "empty file (0 bytes)",
            "masks/zero_mask.png": "empty file (0 bytes)",
            "images/notes.txt": "not an image file",
            "images/lonely.jpg": "image without mask",
            "masks/orphan.png": "mask without image",
            "images/twin.jpg": "ambiguous pairing",
            "images/twin.png": "ambiguous pairing",
            "masks/twin.png": "ambiguous pairing",
        },
    }


def make_simple_folder(root: pathlib.Path, stems: list[str], seed: int = 0) -> pathlib.Path:
    """images/ + masks/ holding one good pair per stem."""
    for i, stem in enumerate(stems):
        write(root / "images" / f"{stem}.jpg", photo(seed + i))
        write(root / "masks" / f"{stem}.png", person(seed + i) * 255)
    return root


def refuse_stat_under(monkeypatch, folder: pathlib.Path) -> None:
    """Makes pathlib's stat of anything inside FOLDER raise PermissionError, as in a folder this
    user may not enter (another's home): chmod does not stop root, who may run the tests."""
    stat = pathlib.Path.stat

    def refusing_stat(self, **kwargs):
        if folder in self.parents:
            raise PermissionError(13, "Permission denied", str(self))
        return stat(self, **kwargs)

    monkeypatch.setattr(pathlib.Path, "stat", refusing_stat)


def ctrl_c_once_said(proc, ready=lambda line: line.endswith("waiting for Ctrl-C\n"),
                     timeout: float = 120) -> tuple[str, str]:
    """Sends PROC (started with stderr piped, as text) a SIGINT, as a terminal's Ctrl-C does,
    once a line of its stderr is READY; checks that it died of it (status 130 in a shell, so that
    a script running it stops too) without a traceback: (its stdout, its whole stderr)."""
    said = []
    for line in proc.stderr:  # ends, and the test fails, if the run ends before it is ready
        said.append(line)
        if ready(line):
            proc.send_signal(signal.SIGINT)
            break
    out, rest = proc.communicate(timeout=timeout)
    err = "".join(said) + rest
    assert proc.returncode == -signal.SIGINT, (said[-3:], err[-2000:])
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-2000:]
    return out, err
