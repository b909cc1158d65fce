"""``tr1 eval --baseline frame-oracle``: the ceiling a frame budget puts on any model.

The oracle is told, for each sample, which of the frames the budget samples (``data.video.smart_nframes`` /
``frame_indices``, as training and evaluation decode them) fall inside the ground-truth span, and the video's
duration, and nothing else. It answers the span between the midpoints to the neighbouring sampled frames (the
video's ends at the edges); when no sampled frame shows the event it answers the gap between the two sampled
frames around it. A model that sees only those frames cannot, on average, do better than this, so a model's mIoU
reads against it: e.g. the demo's 8 frames cap its synthetic test split at 73.8 mIoU, 16 frames at 83.7.
It reads each video's frame count and rate (``probe_video``, once per video), never its pixels.
"""
from __future__ import annotations

from typing import Sequence

import torch

from megatron_tr1.data.annotations import Sample
from megatron_tr1.data.video import frame_indices, probe_video, smart_nframes


def oracle_span(times: torch.Tensor, start: float, end: float, duration: float) -> tuple[float, float]:
    """The span answered from the sampled frames' ``times`` (seconds, increasing) and the event ``[start, end]``."""
    inside = torch.nonzero((times >= start) & (times < end)).flatten().tolist()
    edges = [0.0] + ((times[1:] + times[:-1]) / 2).tolist() + [duration]  # edges[i]..edges[i+1]: frame i's share
    if inside:
        return edges[inside[0]], edges[inside[-1] + 1]
    after = int(torch.searchsorted(times, torch.tensor(start, dtype=times.dtype)))  # first frame past the event
    return (float(times[after - 1]) if after > 0 else 0.0), (float(times[after]) if after < len(times) else duration)


class FrameOraclePredictor:
    """Answers ``oracle_span`` for each sample under the frame budget ``video`` (``rl.config.VideoBudget``)."""

    name = "frame-oracle"

    def __init__(self, video):
        self.video = video

    def predict(self, samples: Sequence[Sample]) -> list[str]:
        texts, infos = [], {}  # a video probed once for all its queries
        for s in samples:
            if s.video not in infos:
                infos[s.video] = probe_video(s.video)
            info = infos[s.video]
            n = smart_nframes(info.total_frames, info.video_fps, fps=self.video.fps,
                              min_frames=self.video.min_frames, max_frames=self.video.max_frames)
            times = frame_indices(info.total_frames, n).double() / info.video_fps
            duration = s.duration if s.duration is not None else info.total_frames / info.video_fps
            lo, hi = oracle_span(times, s.start, s.end, duration)
            texts.append(f"<answer>{lo:.2f} - {hi:.2f}</answer>")
        return texts
