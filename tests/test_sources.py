"""Streamed image sources (training/sources.py) on 2000 generated PNG/JPEG files, as a folder and as tar shards:
the same pixels as the in-memory loader, disjoint covering ranks, workers in order, clear errors for broken files."""
import tarfile

import pytest
import torch

from stream_data import write_folder, write_shards
from training.data import DataOrder, DatasetError, PixelSource, load_dataset
from training.sources import StreamedImages, StreamedPixelSource, loader, open_stream, step_indices

COUNT = 2000


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_folder(tmp_path_factory.mktemp("folder"), COUNT)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_shards(tmp_path_factory.mktemp("shards"), COUNT, per_shard=500)


def decoded(index, count=None):
    images = StreamedImages(index, 8, 1)
    batches = [list(range(start, min(start + 256, count or len(images)))) for start in
               range(0, count or len(images), 256)]
    out = [batch for batch in loader(images, batches, num_workers=0)]
    return torch.cat([b[1] for b in out]), torch.cat([b[2] for b in out])


def test_streamed_folder_matches_the_in_memory_loader(folder):
    index = open_stream(str(folder))
    reference = load_dataset(str(folder), image_size=8)
    assert len(index) == COUNT and index.class_names == reference.class_names
    assert torch.equal(index.labels, reference.labels)
    assert [index.captions[i] for i in range(0, COUNT, 97)] == reference.captions[::97]
    images, sizes = decoded(index)
    assert torch.equal(images, reference.images) and torch.equal(sizes, reference.original_sizes)


def test_tar_shards_hold_the_same_data_as_the_folder(folder, shards):
    from_folder, from_tars = open_stream(str(folder)), open_stream(str(shards))
    assert len(from_tars) == COUNT and from_tars.files.offsets.shape == (5,)  # 4 shards, no per-image paths
    assert torch.equal(from_tars.labels, from_folder.labels)
    assert [from_tars.captions[i] for i in range(0, COUNT, 89)] == [from_folder.captions[i] for i in
                                                                   range(0, COUNT, 89)]
    assert torch.equal(decoded(from_tars, 600)[0], decoded(from_folder, 600)[0])
    assert len(open_stream(str(shards / "*.tar"))) == COUNT and len(open_stream(str(shards / "00001.tar"))) == 500
    in_memory = load_dataset(str(shards / "00001.tar"), image_size=8)  # small shard sets also load into memory
    assert torch.equal(in_memory.images, decoded(from_folder, 1000)[0][500:]) and in_memory.captions[0] == \
        from_folder.captions[500]


def test_two_ranks_read_disjoint_parts_that_cover_each_epoch():
    order = DataOrder(COUNT, seed=3)
    per_rank = [torch.cat(list(step_indices(order, 0, COUNT, 80, 2, rank, grad_accum=2))) for rank in (0, 1)]
    assert len(per_rank[0]) == len(per_rank[1]) == COUNT // 2
    assert not set(per_rank[0].tolist()) & set(per_rank[1].tolist())
    assert sorted(torch.cat(per_rank).tolist()) == list(range(COUNT))
    resumed = torch.cat(list(step_indices(order, 800, COUNT, 80, 2, 1, grad_accum=2)))  # resume = a suffix
    assert torch.equal(resumed, per_rank[1][400:])


def test_workers_return_the_in_memory_batches_in_order(shards, folder):
    """Two workers decode; augmentation with the step generator gives the in-memory PixelSource's exact batches."""
    order = DataOrder(COUNT, seed=1)
    source = StreamedPixelSource(StreamedImages(open_stream(str(shards)), 10, 1), 8, hflip=True, random_crop=True,
                                 num_workers=2)
    reference = PixelSource(load_dataset(str(folder), image_size=8, crop_margin=2), 8, True, True)
    source.start(step_indices(order, 0, 320, 64, 1, 0, 1))
    for indices in step_indices(order, 0, 320, 64, 1, 0, 1):
        x, control = source.batch(indices, torch.Generator().manual_seed(len(indices)))
        x_ref, control_ref = reference.batch(indices, torch.Generator().manual_seed(len(indices)))
        assert torch.equal(x, x_ref) and torch.equal(control, control_ref)
    with pytest.raises(RuntimeError, match="start"):
        StreamedPixelSource(source.images, 8, False, False, 0).batch(indices, torch.Generator())


def test_a_corrupt_image_names_its_file(tmp_path):
    root = write_folder(tmp_path / "broken", 12)
    victim = sorted((root / "class1").iterdir())[0]
    victim.write_bytes(b"not an image at all")
    images = StreamedImages(open_stream(str(root)), 8, 1)
    with pytest.raises(DatasetError, match=victim.name):
        list(loader(images, [list(range(12))], num_workers=1))


def test_a_corrupt_tar_member_names_shard_and_member(tmp_path):
    root = write_shards(tmp_path / "bad", 20, per_shard=20)
    shard = root / "00000.tar"
    with tarfile.open(shard) as archive:
        member = [m for m in archive.getmembers() if m.name.endswith(".png")][2]
    data = bytearray(shard.read_bytes())
    data[member.offset_data:member.offset_data + member.size] = bytes(member.size)  # zeroed image bytes
    shard.write_bytes(bytes(data))
    index = open_stream(str(root))
    broken = [i for i in range(20) if index.offset[i] == member.offset_data][0]
    with pytest.raises(DatasetError, match=f"00000.tar:{member.name}: unreadable image"):
        StreamedImages(index, 8, 1)[broken]


def test_a_truncated_shard_names_the_shard(tmp_path):
    root = write_shards(tmp_path / "cut", 40, per_shard=20)
    shard = root / "00001.tar"
    shard.write_bytes(shard.read_bytes()[:3000])
    with pytest.raises(DatasetError, match="00001.tar"):
        open_stream(str(root))
    with pytest.raises(DatasetError, match="no .tar shards"):
        open_stream(str(root / "*.tgz"))


def test_a_member_cut_after_indexing_names_the_shard(tmp_path):
    """A shard truncated while a job runs: the worker's read fails with the shard's name, not a PIL error."""
    root = write_shards(tmp_path / "late", 20, per_shard=20)
    index = open_stream(str(root))
    shard = root / "00000.tar"
    with tarfile.open(shard) as archive:
        last = [m for m in archive.getmembers() if m.name.endswith((".png", ".jpg"))][-1]
    shard.write_bytes(shard.read_bytes()[:last.offset_data + 5])
    with pytest.raises(DatasetError, match="00000.tar.*truncated"):
        StreamedImages(index, 8, 1)[19]
