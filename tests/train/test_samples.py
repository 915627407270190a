"""The torchvision engine's training order: batches of one orientation, every image once an epoch."""

from pathlib import Path

import pytest

from d2retrain.data.instances import InstanceEntry
from d2retrain.data.records import ImageRecord
from d2retrain.train.samples import TrainSamples


def records(orientations: str) -> list[ImageRecord]:
    """One record per letter: L landscape, P portrait; each with one box (the order is not read)."""
    sizes = {"L": (192, 256), "P": (256, 192)}
    return [
        ImageRecord(index, Path(f"{index}.jpg"), *sizes[letter], (InstanceEntry(index, 1, [], (1, 1, 9, 9)),))
        for index, letter in enumerate(orientations)
    ]


@pytest.mark.parametrize("batch", [2, 4])
def test_grouped_epochs_hold_every_image_once_in_batches_of_one_orientation(batch):
    kinds = "LLPLPPLLLPLPPPLLLLPLP"  # 21 images, 12 landscape, 9 portrait
    samples = TrainSamples(records(kinds), seed=3, flip=False, group=batch)
    for epoch in range(3):
        order = samples.epoch(epoch).tolist()
        assert sorted(order) == list(range(len(kinds)))
        full = len(order) - sum(kinds.count(k) % batch for k in "LP")  # the leftovers end the epoch
        for start in range(0, full, batch):
            assert len({kinds[i] for i in order[start : start + batch]}) == 1, (epoch, start)
    again = TrainSamples(records(kinds), seed=3, flip=False, group=batch)
    assert [again.index_at(p) for p in range(60)] == [samples.index_at(p) for p in range(60)]  # resumable


def test_without_grouping_the_order_is_the_plain_permutation_and_grouping_keeps_its_images():
    kinds = "LPLPLPLPLP"
    plain = TrainSamples(records(kinds), seed=0, flip=False)
    grouped = TrainSamples(records(kinds), seed=0, flip=False, group=2)
    assert sorted(plain.epoch(0).tolist()) == sorted(grouped.epoch(0).tolist())
    mixed = [
        {kinds[i] for i in plain.epoch(e).tolist()[s : s + 2]} for e in range(5) for s in range(0, 10, 2)
    ]
    assert any(len(pair) == 2 for pair in mixed)  # unordered, some batches mix: the grouping does something
