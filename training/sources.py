"""Streamed image sources for data sets too large to hold in memory: an image folder (class per sub-folder, optional
`captions.json` sidecar) or WebDataset tar shards as img2dataset writes them (`<key>.jpg|.png` + `<key>.cls` or
`<key>.txt|.json` captions).

Only a compact index is kept: numpy arrays of ~40 bytes per image (shard, byte offset and size of each member, label),
shared copy-on-write by DataLoader workers (Python lists of str would be copied into every worker by refcounting).
Workers decode and resize images on the fly; everything random (order, flips, crops) stays in the main process, so
the order remains the seeded DataOrder stream indexed by images seen and a resumed run reads the same batches.

Tar shards are read by random access (member offsets from the tar headers, found once with the stdlib `tarfile`),
not streamed sequentially with `webdataset.WebDataset`: its shard shuffle + shuffle buffer gives an order that
depends on the worker count and cannot be resumed at an image position, which the exact-resume contract needs.
"""
import contextlib
import glob
import io
import json
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from training.data import IMAGE_SUFFIXES, DatasetError, augment, fit_to_size

TAR_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
CAPTION_SUFFIXES = (".txt", ".json")


def is_streamed(name: str, stream: bool = False) -> bool:
    """Tar shards (a .tar file, a folder of them, or a glob like /data/cc3m/*.tar) always stream; an image folder
    streams when `stream` (data.stream / --stream); digits and .npz sets load into memory."""
    path = Path(name)
    return name.endswith(".tar") or "*" in name or (path.is_dir() and (stream or any(path.glob("*.tar"))))


class PackedStrings:
    """Many strings in one uint8 buffer + offsets (about one byte per character, no per-object overhead)."""

    def __init__(self, strings):
        encoded = [s.encode() for s in strings]
        self.offsets = np.cumsum([0] + [len(e) for e in encoded], dtype=np.int64)
        self.buffer = np.frombuffer(b"".join(encoded), dtype=np.uint8)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> str:
        return self.buffer[self.offsets[i]:self.offsets[i + 1]].tobytes().decode()


@dataclass
class StreamIndex:
    """Where every image (and caption) of a streamed data set lives. Folder: `files` holds one path per image.
    Tar: `files` holds the shard paths and (shard, offset, size) locate each member."""
    files: PackedStrings
    shard: np.ndarray | None            # int32 [N] (tar)
    offset: np.ndarray | None           # int64 [N] image member data offset (tar)
    size: np.ndarray | None             # int64 [N]
    caption_offset: np.ndarray | None   # int64 [N] caption member (tar), -1 = none
    caption_size: np.ndarray | None
    caption_json: np.ndarray | None     # bool [N]: the caption member is img2dataset's .json ({"caption": ...})
    labels: torch.Tensor | None         # int64 [N]
    class_names: list[str]
    captions: "PackedStrings | TarCaptions | None"
    name: str

    def __len__(self) -> int:
        return len(self.files) if self.shard is None else len(self.shard)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def location(self, i: int) -> str:
        """The file (shard:member for tar) of item i, for error messages."""
        if self.shard is None:
            return self.files[i]
        shard, offset = self.files[int(self.shard[i])], int(self.offset[i])
        try:  # the member's 512-byte header sits right before its data
            name = tarfile.TarInfo.frombuf(read_member(shard, offset - 512, 512), "utf-8", "surrogateescape").name
        except (DatasetError, tarfile.TarError):
            name = f"member at byte {offset}"
        return f"{shard}:{name}"

    def read_image_bytes(self, i: int) -> bytes:
        if self.shard is None:
            return Path(self.files[i]).read_bytes()
        return read_member(self.files[int(self.shard[i])], int(self.offset[i]), int(self.size[i]))


def read_member(path: str, offset: int, size: int) -> bytes:
    with open(path, "rb") as handle:
        handle.seek(offset)
        data = handle.read(size)
    if len(data) != size:
        raise DatasetError(f"data set {path}: truncated tar shard (member at byte {offset} needs {size} bytes, "
                           f"got {len(data)})")
    return data


class TarCaptions:
    """Captions read lazily from the tar members (img2dataset's .txt, or the "caption" field of its .json)."""

    def __init__(self, index: StreamIndex):
        self.index = index

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> str:
        index = self.index
        if index.caption_offset[i] < 0:
            raise DatasetError(f"data set {index.location(i)}: no .txt or .json caption for this image")
        text = read_member(index.files[int(index.shard[i])], int(index.caption_offset[i]),
                           int(index.caption_size[i])).decode()
        return str(json.loads(text).get("caption", "")) if index.caption_json[i] else text


def open_stream(name: str) -> StreamIndex:
    """Index an image folder or tar shards (nothing is decoded here)."""
    path = Path(name)
    if path.is_dir() and not any(path.glob("*.tar")):
        return index_folder(path)
    shards = sorted(path.glob("*.tar")) if path.is_dir() else sorted(glob.glob(name)) if "*" in name else [path]
    if not shards or not all(Path(s).is_file() for s in shards):
        raise DatasetError(f"data set {name}: no .tar shards found")
    return _index_tars([str(s) for s in shards], name)


def index_folder(root: Path) -> StreamIndex:
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir())
    files = [(f, label) for label, d in enumerate(class_dirs)
             for f in sorted(d.iterdir()) if f.suffix.lower() in IMAGE_SUFFIXES]
    if not files:
        raise DatasetError(f"data set {root}: no images found in class sub-folders (expected root/<class>/*.png)")
    captions = None
    caption_file = root / "captions.json"
    if caption_file.exists():
        try:
            caption_map = json.loads(caption_file.read_text())
        except json.JSONDecodeError as error:
            raise DatasetError(f"data set {caption_file}: not valid JSON ({error})") from error
        keys = [f"{f.parent.name}/{f.name}" for f, _ in files]
        missing = [k for k in keys if k not in caption_map] if isinstance(caption_map, dict) else keys
        if missing:
            raise DatasetError(f"data set {caption_file}: must map every '<class>/<file>' to a caption; "
                               f"missing e.g. {missing[:3]}")
        captions = PackedStrings(str(caption_map[k]) for k in keys)
    labels = torch.tensor([label for _, label in files], dtype=torch.int64)
    return StreamIndex(PackedStrings(str(f) for f, _ in files), None, None, None, None, None, None, labels,
                       [d.name for d in class_dirs], captions, str(root))


def _index_tars(shards: list[str], name: str) -> StreamIndex:
    """One pass over the tar headers of every shard; samples group members by key (the name without suffix)."""
    columns = {k: [] for k in ("shard", "offset", "size", "caption_offset", "caption_size", "caption_json", "label")}
    for shard_id, shard in enumerate(shards):
        samples = {}
        try:
            file_size = Path(shard).stat().st_size
            with tarfile.open(shard, mode="r:") as archive:
                for member in archive:
                    if not member.isfile():
                        continue
                    if member.offset_data + member.size > file_size:
                        raise tarfile.ReadError(f"member {member.name} extends past the end of the file")
                    key, suffix = member.name.rsplit(".", 1) if "." in member.name else (member.name, "")
                    samples.setdefault(key, {})["." + suffix.lower()] = member
                    if suffix.lower() == "cls":
                        samples[key]["label"] = int(archive.extractfile(member).read().decode().strip())
        except (tarfile.TarError, OSError, ValueError) as error:
            raise DatasetError(f"data set {shard}: unreadable or truncated tar shard ({error})") from error
        for members in samples.values():  # in tar order
            image = next((members[s] for s in TAR_IMAGE_SUFFIXES if s in members), None)
            if image is None:
                continue  # img2dataset writes .json/.txt for failed downloads without an image
            caption = next((members[s] for s in CAPTION_SUFFIXES if s in members), None)
            for column, value in (("shard", shard_id), ("offset", image.offset_data), ("size", image.size),
                                  ("caption_offset", caption.offset_data if caption else -1),
                                  ("caption_size", caption.size if caption else 0),
                                  ("caption_json", caption is not None and caption.name.endswith(".json")),
                                  ("label", members.get("label", -1))):
                columns[column].append(value)
    if not columns["shard"]:
        raise DatasetError(f"data set {name}: the tar shards hold no images (.jpg/.png/.webp)")
    label = np.array(columns["label"], dtype=np.int64)
    labels, class_names = None, []
    if (label >= 0).all():
        labels, class_names = torch.from_numpy(label), [str(c) for c in range(int(label.max()) + 1)]
    index = StreamIndex(PackedStrings(shards), np.array(columns["shard"], dtype=np.int32),
                        np.array(columns["offset"], dtype=np.int64), np.array(columns["size"], dtype=np.int64),
                        np.array(columns["caption_offset"], dtype=np.int64),
                        np.array(columns["caption_size"], dtype=np.int64), np.array(columns["caption_json"]),
                        labels, class_names, None, name)
    if (index.caption_offset >= 0).all():
        index.captions = TarCaptions(index)
    return index


class StreamedImages(torch.utils.data.Dataset):
    """Item i -> (i, uint8 [C, S, S] at storage size S, original (h, w)); decoded by the DataLoader workers."""

    def __init__(self, index: StreamIndex, store_size: int, channels: int, resize: str = "resize"):
        self.index, self.store_size, self.channels, self.resize = index, store_size, channels, resize

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int):
        with open_image(self.index, i) as image:
            image = image.convert("L" if self.channels == 1 else "RGB")
            array = np.asarray(image, dtype=np.uint8).reshape(image.height, image.width, self.channels)
        pixels = torch.from_numpy(array.copy()).permute(2, 0, 1)[None]
        return i, fit_to_size(pixels, self.store_size, self.resize)[0], torch.tensor(array.shape[:2])


@contextlib.contextmanager
def open_image(index: StreamIndex, i: int):
    """PIL image of item i (lazy: .size reads only the header); any decoding error names the file."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(index.read_image_bytes(i))) as image:
            yield image
    except (OSError, SyntaxError, ValueError) as error:  # PIL raises all three for broken files
        raise DatasetError(f"data set {index.location(i)}: unreadable image ({error})") from error


def header_sizes(index: StreamIndex, count: int = 4096) -> torch.Tensor:
    """(h, w) of the first `count` images, int64 [n, 2], from their headers (for paper 2's sampling control)."""
    sizes = []
    for i in range(min(count, len(index))):
        with open_image(index, i) as image:
            sizes.append((image.height, image.width))
    return torch.tensor(sizes, dtype=torch.int64)


def step_indices(order, start_images: int, total_images: int, batch_size: int, world_size: int, rank: int,
                 grad_accum: int):
    """The data-set indices this rank reads, micro-batch by micro-batch, from `start_images` on: the same positions
    of the DataOrder stream the training loop takes, so ranks read disjoint parts that together cover each step."""
    micro_batch = batch_size // (world_size * grad_accum)
    for images_seen in range(start_images, total_images, batch_size):
        for accum_round in range(grad_accum):
            yield order.indices(images_seen + (accum_round * world_size + rank) * micro_batch, micro_batch)


def loader(images, batches, num_workers: int, prefetch_factor: int = 4):
    """A DataLoader over an iterable of index batches, in order (map-style: workers return batches in sequence).
    In-memory images need no decoding, so they never start workers."""
    num_workers = num_workers if isinstance(images, StreamedImages) else 0
    return torch.utils.data.DataLoader(images, batch_sampler=batches, num_workers=num_workers,
                                       prefetch_factor=prefetch_factor if num_workers else None,
                                       persistent_workers=False)


class StreamedPixelSource:
    """PixelSource for streamed images: `start(index batches)` launches the workers on the batches the training loop
    will ask for; `batch(indices, generator)` takes the next decoded batch (checked against `indices`) and augments
    it in the main process with the step's generator, exactly as the in-memory PixelSource does."""

    def __init__(self, images: StreamedImages, image_size: int, hflip: bool, random_crop: bool, num_workers: int):
        self.images, self.image_size, self.hflip, self.random_crop = images, image_size, hflip, random_crop
        self.num_workers, self._batches = num_workers, None

    def start(self, batches) -> None:
        self._batches = iter(loader(self.images, batches, self.num_workers))

    def batch(self, indices: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        if self._batches is None:
            raise RuntimeError("StreamedPixelSource.start(batches) must be called before batch()")
        loaded, images, sizes = next(self._batches)
        if not torch.equal(loaded, indices):
            raise RuntimeError("streamed batch does not match the training loop's data order (start() was given "
                               "other positions)")
        return augment(images, sizes, self.image_size, self.hflip, self.random_crop, generator)


class InMemoryImages(torch.utils.data.Dataset):
    """An in-memory ImageDataset behind the StreamedImages interface (the encode command reads both alike)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        return i, self.dataset.images[i], self.dataset.original_sizes[i]


def open_images(name: str, data_path: str | None, split: str, store_size: int, channels: int, resize: str,
                stream: bool):
    """(a Dataset of (i, uint8 [C, S, S], original (h, w)), its catalogue with labels / captions / class names).
    Tar shards always stream, an image folder streams when `stream`; the small sets load into memory as before."""
    if is_streamed(name, stream):
        index = open_stream(name)
        return StreamedImages(index, store_size, channels, resize), index
    from training.data import load_dataset

    dataset = load_dataset(name, data_path, split, store_size, channels, resize)
    return InMemoryImages(dataset), dataset
