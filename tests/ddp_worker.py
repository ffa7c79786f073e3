"""One rank of tests/test_tokenizer.py's DDP test: trains through tokenizer.main, then saves what
this rank ended with (its parameters and the clips it read) so the test can compare the ranks."""

import os
import sys

import torch

import data
import tokenizer

models, seen = [], set()


class RecordedCoordTok(tokenizer.CoordTok):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        models.append(self)


class RecordedDataset(data.VideoDataset):
    def __getitem__(self, index):
        if isinstance(index, tuple):  # training reads: (video index, seed of its random start) from ClipSampler
            seen.add(index)
        return super().__getitem__(index)


tokenizer.CoordTok = RecordedCoordTok
data.VideoDataset = RecordedDataset
tokenizer.main(sys.argv[1:])
out_dir = next(a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("--out_dir="))
rank = int(os.environ["RANK"])
torch.save({"params": {k: v.detach().clone() for k, v in models[0].state_dict().items()}, "seen": seen},
           os.path.join(out_dir, f"rank{rank}.pt"))
