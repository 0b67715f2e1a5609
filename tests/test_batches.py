"""to_device keeps the batch's container types."""

from collections import UserDict, defaultdict, namedtuple

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
