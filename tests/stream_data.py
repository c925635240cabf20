"""Generated streamed data sets for the tests: a class-per-sub-folder image folder (PNG and JPEG, captions.json) and
the same images as img2dataset-style tar shards (<key>.png|.jpg + <key>.cls + <key>.txt)."""
import io
import json
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = 4


def images(count: int, seed: int = 0):
    """(name, PIL image, label, caption) per image: small random-size grayscale blobs, every 3rd one a JPEG."""
    rng = np.random.default_rng(seed)
    for i in range(count):
        label = i % CLASSES
        height, width = rng.integers(9, 14, size=2)
        pixels = (rng.random((height, width)) * 64 + label * 48).astype(np.uint8)
        suffix = ".jpg" if i % 3 == 0 else ".png"
        yield f"{i:06d}{suffix}", Image.fromarray(pixels, "L"), label, f"a blob of class {label} number {i}"


def encode(image: Image.Image, name: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG" if name.endswith(".jpg") else "PNG")
    return buffer.getvalue()


def write_folder(root: Path, count: int) -> Path:
    """root/<class>/<name> + root/captions.json."""
    captions = {}
    for name, image, label, caption in images(count):
        (root / f"class{label}").mkdir(parents=True, exist_ok=True)
        (root / f"class{label}" / name).write_bytes(encode(image, name))
        captions[f"class{label}/{name}"] = caption
    (root / "captions.json").write_text(json.dumps(captions))
    return root


def write_shards(root: Path, count: int, per_shard: int) -> Path:
    """root/<shard>.tar in the folder's order (class by class), so both sources list the same images."""
    root.mkdir(parents=True, exist_ok=True)
    ordered = sorted(images(count), key=lambda item: (item[2], item[0]))
    for shard in range(0, count, per_shard):
        with tarfile.open(root / f"{shard // per_shard:05d}.tar", "w") as archive:
            for name, image, label, caption in ordered[shard:shard + per_shard]:
                key = f"{shard // per_shard:05d}{name[:-4]}"
                for member, data in ((key + name[-4:], encode(image, name)), (f"{key}.cls", str(label).encode()),
                                     (f"{key}.txt", caption.encode())):
                    info = tarfile.TarInfo(member)
                    info.size = len(data)
                    archive.addfile(info, io.BytesIO(data))
    return root
