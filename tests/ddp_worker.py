"""One rank of a two-process DDP test: `ddp_worker.py tokenizer|dit FLAGS...` trains through that script's
main(), then saves what this rank ended with (its parameters, and for the tokenizer the clips it read) so
the test can compare the ranks with each other and with a single-process run."""

import importlib
import os
import sys

import torch

import data

stage = importlib.import_module(sys.argv[1])
model_class = stage.CoordTok if sys.argv[1] == "tokenizer" else stage.SiT
models, seen = [], set()


class Recorded(model_class):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        models.append(self)


class RecordedDataset(data.VideoDataset):
    def __getitem__(self, index):
        if isinstance(index, tuple):  # training reads: (video index, seed of its random start) from ClipSampler
            seen.add(index)
        return super().__getitem__(index)


setattr(stage, model_class.__name__, Recorded)
data.VideoDataset = RecordedDataset
stage.main(sys.argv[2:])
out_dir = next(a.split("=", 1)[1] for a in sys.argv[2:] if a.startswith("--out_dir="))
rank = int(os.environ["RANK"])
torch.save({"params": {k: v.detach().clone() for k, v in models[0].state_dict().items()}, "seen": seen},
           os.path.join(out_dir, f"rank{rank}.pt"))
