"""Test support: a faithful re-implementation of lmms-eval's ``tasks/charades_sta/eval_tvg.py`` (Temporal-R1's
vendored copy), statement by statement, bugs included (the HH:MM:SS fallback's tuple ``t`` and stale
``time_in_sec``, ``float`` on ``1..2``, the division by a zero union), so our scorer can be checked against the
original's reading of our ``submission.json``. Deliberately independent of ``megatron_tr1.eval.protocols``.
"""
import json
import re


def extract_time(paragraph):
    prompt = "A specific example is : 20.8 - 30.0 seconds".lower()
    paragraph = paragraph.lower().replace(prompt, "").replace("to", "-")
    sentences = re.split(r"[!?\n]", paragraph)
    keywords = ["starts", "ends", "happens in", "start time", "end time", "start", "end", "happen"]
    candidates = [sentence for sentence in sentences if any(keyword in sentence for keyword in keywords)]
    timestamps = []
    for time_pattern in [r"(\d+\.*\d*)\s*-\s*(\d+\.*\d*)"]:
        time_matches = re.findall(time_pattern, paragraph)
        if time_matches:
            timestamps = [[float(start), float(end)] for start, end in time_matches]
    if len(sentences) == 0:
        return []
    unset = object()
    time_in_sec = unset  # a Python local: what the last loop below assigned stays visible to the next one
    if len(timestamps) == 0:
        times = []
        for sentence in candidates:
            time = re.findall(r"\b(\d+\.\d+\b|\b\d+)\b", sentence)
            if time:
                time_in_sec = float(time[0])
                times.append(time_in_sec)
        times = times[: len(times) // 2 * 2]
        timestamps = [(times[i], times[i + 1]) for i in range(0, len(times), 2)]
    if len(timestamps) == 0:
        times = []
        for sentence in candidates:
            time = re.findall(r"\b((\d{1,2}:\d{2}:\d{2}))\b", sentence)
            if not time:
                continue
            t = time[0]  # a tuple of the two groups: neither branch below runs on it
            if t.count(":") == 2:
                h, m, s = map(int, t.split(":"))
                time_in_sec = h * 3600 + m * 60 + s
            elif t.count(":") == 1:
                m, s = map(int, t.split(":"))
                time_in_sec = m * 60 + s
            if time_in_sec is unset:
                raise UnboundLocalError("time_in_sec")
            times.append(time_in_sec)
        times = times[: len(times) // 2 * 2]
        timestamps = [(times[i], times[i + 1]) for i in range(0, len(times), 2)]
    results = []
    for start, end in timestamps:
        results.append([start, end] if end > start else [end, start])
    return results[:1]


def iou(A, B):
    max0, min0 = max(A[0], B[0]), min(A[0], B[0])
    max1, min1 = max(A[1], B[1]), min(A[1], B[1])
    return max(min1 - max0, 0) / (max1 - min0)


def score_file(path):
    """The script's ``__main__`` on ``path``: ``(R@0.3, R@0.5, R@0.7, mIoU, num)``; raises where it raises."""
    with open(path) as f:
        datas = json.load(f)
    num = len(datas)
    ious = []
    for k in datas.keys():
        vid, caption, gt = k.split(">>>")
        pred = datas[k]
        gt = eval(gt)
        timestamps = extract_time(pred)
        if len(timestamps) != 1:
            timestamps = [[gt[1] + 10, gt[1] + 20]]
        ious.append(iou(gt, timestamps[0]))
    recall = {c: sum(cur >= c for cur in ious) * 100 / num for c in (0.3, 0.5, 0.7)}
    return recall[0.3], recall[0.5], recall[0.7], sum(ious) * 100 / num, num
