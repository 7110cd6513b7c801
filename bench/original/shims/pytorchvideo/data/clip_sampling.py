"""ConstantClipsPerVideoSampler: ``clips_per_video`` clips of ``clip_duration`` seconds whose starts
split the playable range evenly; each call returns the next clip, the last one flagged."""

from fractions import Fraction
from typing import NamedTuple


class ClipInfo(NamedTuple):
    clip_start_sec: Fraction
    clip_end_sec: Fraction
    clip_index: int
    aug_index: int
    is_last_clip: bool


class ConstantClipsPerVideoSampler:
    def __init__(self, clip_duration: float, clips_per_video: int, augs_per_clip: int = 1):
        self._clip_duration = Fraction(clip_duration)
        self._clips_per_video, self._augs_per_clip = clips_per_video, augs_per_clip
        self.reset()

    def reset(self) -> None:
        self._clip, self._aug = 0, 0

    def __call__(self, last_clip_time, video_duration, annotation=None) -> ClipInfo:
        latest_start = Fraction(max(video_duration - self._clip_duration, 0))
        spacing = latest_start / self._clips_per_video
        start, clip, aug = spacing * self._clip, self._clip, self._aug
        self._aug += 1
        if self._aug >= self._augs_per_clip:
            self._clip, self._aug = self._clip + 1, 0
        last = self._clip >= self._clips_per_video or spacing * self._clip > latest_start
        if last:
            self.reset()
        return ClipInfo(start, start + self._clip_duration, clip, aug, last)
