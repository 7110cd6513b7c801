"""Stand-in for tensorboardX.SummaryWriter: keeps the scalars in memory instead of event files.

The original logs loss and token accuracy every micro-batch. The bench wrapper reads the loss
from ``SummaryWriter.scalars``. ``float()`` of a CUDA tensor synchronises, as tensorboardX's own
conversion did; the original calls ``loss.item()`` right after anyway, so the step pays no
extra synchronisation compared with the real writer (which also wrote a small event record).
"""

from collections import defaultdict


class SummaryWriter:
    latest = None  # the last writer made (the agent's)

    def __init__(self, logdir=None, *args, **kwargs):
        self.logdir = logdir
        self.scalars = defaultdict(list)
        SummaryWriter.latest = self

    def add_scalar(self, tag, value, global_step=None, *args, **kwargs):
        self.scalars[tag].append((global_step, float(value.detach() if hasattr(value, "detach") else value)))

    def flush(self):
        pass

    def close(self):
        pass
