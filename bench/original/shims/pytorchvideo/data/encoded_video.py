"""EncodedVideo.from_path(..., decoder="decord"): frames of a time window as a (C, T, H, W) float
tensor in [0, 255], decoded by decord (video only: the original passes decode_audio=False)."""

import math

import torch


class EncodedVideo:
    def __init__(self, path: str):
        import decord

        self._reader = decord.VideoReader(str(path), ctx=decord.cpu(0))
        self._fps = float(self._reader.get_avg_fps())
        self.duration = len(self._reader) / self._fps

    @classmethod
    def from_path(cls, file_path, decode_audio: bool = True, decoder: str = "pyav", **kwargs):
        if decoder != "decord":
            raise NotImplementedError(f"pytorchvideo stand-in: decord decoder only, asked for {decoder!r}")
        return cls(file_path)

    def get_clip(self, start_sec, end_sec) -> dict:
        if start_sec > end_sec or start_sec > self.duration:
            raise RuntimeError(f"clip {start_sec}-{end_sec} s lies outside the video (duration {self.duration} s)")
        first = math.ceil(self._fps * start_sec)
        end = min(math.ceil(self._fps * end_sec), len(self._reader))
        frames = self._reader.get_batch(list(range(first, end)))
        frames = frames.asnumpy() if hasattr(frames, "asnumpy") else frames.numpy()
        video = torch.from_numpy(frames).to(torch.float32).permute(3, 0, 1, 2)  # T H W C -> C T H W
        return {"video": video, "audio": None}

    def close(self) -> None:
        self._reader = None
