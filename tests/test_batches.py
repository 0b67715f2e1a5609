"""to_device keeps the batch's container types."""

from collections import UserDict, defaultdict, namedtuple

import pytest
import torch
from torch.nn.utils.rnn import pack_sequence

from autolr_fast.batches import to_device

Pair = namedtuple("Pair", ["x", "mask"])


class Encoding(UserDict):
    """Like Hugging Face's BatchEncoding: a UserDict with an attribute of its own."""

    def __init__(self, data=None, tag="t"):
        super().__init__(data)
        self.tag = tag


def test_containers_keep_their_types_and_every_tensor_moves():
    device = torch.device("meta")  # another device, on any machine
    d = defaultdict(list, {"a": torch.ones(2)})
    batch = [Pair(torch.ones(2), torch.zeros(2)), d, Encoding({"ids": torch.ones(3)}, tag="x"),
             (pack_sequence([torch.ones(3), torch.ones(2)]), "label"), {"plain": torch.ones(1)}]
    out = to_device(batch, device)
    pair, dd, enc, (packed, label), plain = out
    assert type(pair) is Pair and pair.x.device == device and pair.mask.device == device
    assert type(dd) is defaultdict and dd.default_factory is list and dd["a"].device == device
    assert type(enc) is Encoding and enc.tag == "x" and enc["ids"].device == device
    assert packed.data.device == device and label == "label" and type(plain) is dict
    assert batch[1]["a"].device.type == "cpu" and batch[2]["ids"].device.type == "cpu"  # the input is left as it was


def test_non_blocking_to_another_device_than_a_gpu_pins_nothing():
    # pin_memory() needs CUDA: on this path it must not be called
    x = torch.arange(6.0)
    assert to_device((x, x), torch.device("meta"), non_blocking=True)[0].device.type == "meta"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_non_blocking_copies_from_pageable_memory_are_pinned_first(monkeypatch):
    x, packed = torch.randn(1000, 7), pack_sequence([torch.randn(5), torch.randn(3)])
    assert not x.is_pinned()
    pinned = []
    pin = torch.Tensor.pin_memory
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda t, *a, **k: pinned.append(t.shape) or pin(t, *a, **k))
    out, out_packed = to_device((x, packed), torch.device("cuda"), non_blocking=True)
    assert torch.Size([1000, 7]) in pinned and torch.Size([8]) in pinned  # the packed data too
    torch.cuda.synchronize()
    assert torch.equal(out.cpu(), x) and torch.equal(out_packed.data.cpu(), packed.data)
    assert not x.is_pinned()  # the caller's tensor is left as it was


def test_fresh_iter_leaves_a_loader_subclass_with_its_own_iter_to_it():
    from autolr_fast.batches import fresh_iter

    class Shard(torch.utils.data.DataLoader):  # as accelerate's DataLoaderShard: its own __iter__
        def __iter__(self):
            for x in super().__iter__():
                yield [t * 100 for t in x]

    data = torch.utils.data.TensorDataset(torch.arange(4.0))
    shard = Shard(data, batch_size=2, num_workers=1, persistent_workers=True)
    assert [b[0].tolist() for b in fresh_iter(shard)] == [[0.0, 100.0], [200.0, 300.0]]
    plain = torch.utils.data.DataLoader(data, batch_size=2, num_workers=1, persistent_workers=True)
    it = fresh_iter(plain)
    assert [b[0].tolist() for b in it] == [[0.0, 1.0], [2.0, 3.0]] and plain._iterator is None
