"""Overlay sink: sensor-time frame folding, video and PNG output read back, pixels checked."""
from __future__ import annotations

import math
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from sinks.overlay import (
    BACKGROUND,
    FrameFolder,
    OverlayConfig,
    OverlaySink,
    auto_scale,
    class_color,
    frame_count,
    frame_index,
)
from stream.config import Config, build
from stream.events import Instance, MaskResult, SensorSize, Step, StreamReset, make_events
from stream.metrics import Metrics
from stream.node import NodeError, RunContext, UsageError
from stream.registry import SINKS

W, H = 40, 32  # auto scale 8 -> 320x256
NO_GUI = (False, "test: no display")


def _mask_a() -> np.ndarray:
    m = np.zeros((H, W), np.uint8)
    m[4:12, 6:16] = 1  # class 1 block, top left
    return m


def _mask_b() -> np.ndarray:
    m = np.zeros((H, W), np.uint8)
    m[20:28, 24:36] = 2  # class 2 block, bottom right
    return m


def _result(i: int, bin_us: int, mask: np.ndarray, t_start: int = 0, events: bool = True) -> MaskResult:
    t0 = t_start + i * bin_us
    # events only on the bottom row, away from the mask blocks
    ev = make_events([t0 + 1, t0 + 2], [1, 3], [H - 1, H - 1], [1, 0]) if events else make_events([], [], [], [])
    step = Step(i, t0, t0 + bin_us, None, ev, SensorSize(W, H), time.perf_counter_ns(), source="t")
    return MaskResult(step, mask, [Instance(1, 1, (6, 4, 15, 11), 80)], extra={"adapt.c_l": 0.01})


def _ctx(run_dir: Path | None = None) -> RunContext:
    return RunContext(stop=threading.Event(), metrics=Metrics(), run_dir=run_dir)


def _run(sink: OverlaySink, items: list, run_dir: Path | None = None) -> OverlaySink:
    sink.open(_ctx(run_dir))
    try:
        for it in items:
            sink.process(it)
    finally:
        sink.close()
    return sink


def _blend(k: int, alpha: float = 0.45) -> np.ndarray:
    return np.rint(np.asarray(BACKGROUND, float) * (1 - alpha) + np.asarray(class_color(k), float) * alpha)


def test_frame_maths() -> None:
    assert frame_index(0, 0, 30) == 0 and frame_index(33_333, 0, 30) == 0 and frame_index(33_334, 0, 30) == 1
    assert frame_index(1_040_000, 1_000_000, 25) == 1  # exact boundary belongs to the next frame
    assert frame_count(0, 350_000, 30) == 11 and frame_count(0, 1_000_000, 30) == 30 and frame_count(5, 5, 30) == 1
    assert auto_scale(SensorSize(34, 34)) == 8 and auto_scale(SensorSize(346, 260)) == 1
    assert auto_scale(SensorSize(128, 128)) == 2


def test_folder_unions_masks_and_repeats_them_in_empty_frames() -> None:
    folder = FrameFolder(fps=10, decay_ms=50)  # 100 ms frames
    frames = folder.add(_result(0, 40_000, _mask_a()))  # [0, 40) ms -> frame 0
    frames += folder.add(_result(1, 40_000, _mask_b()))  # [40, 80) -> frame 0: union
    frames += folder.add(_result(2, 40_000, np.zeros((H, W), np.uint8)))  # [80, 120) -> frame 0
    assert frames == []
    frames += folder.add(_result(3, 120_000, _mask_b(), events=False))  # t0 = 360 ms -> frame 3
    assert [f.index for f in frames] == [0, 1, 2]
    u = frames[0].mask
    assert (u[4:12, 6:16] == 1).all() and (u[20:28, 24:36] == 2).all()
    assert np.array_equal(frames[1].mask, frames[0].mask) and np.array_equal(frames[2].mask, frames[0].mask)
    # events: full intensity in their frame, then decay by exp(-100/50) per frame
    assert frames[0].ev_img[H - 1, 1, 1] == 1.0 and frames[0].ev_img[H - 1, 3, 0] == 1.0
    assert frames[1].ev_img[H - 1, 1, 1] == pytest.approx(math.exp(-2))
    assert frames[0].n_events == 6 and frames[1].n_events == 0
    rest = folder.flush()  # segment [0, 480 ms) -> ceil(4.8) = 5 frames in total
    assert [f.index for f in rest] == [3, 4]
    assert np.array_equal(rest[0].mask, _mask_b())


def test_video_has_the_expected_frames_and_mask_colours(tmp_path: Path) -> None:
    path = tmp_path / "out.mp4"
    bin_us, n = 7_000, 50  # 350 ms of sensor time at 30 fps -> ceil(10.5) = 11 frames
    items = [_result(i, bin_us, _mask_a() if i % 2 == 0 else _mask_b()) for i in range(n)]
    sink = _run(OverlaySink(build(OverlayConfig, {"show_hud": False}), str(path), gui=NO_GUI), items)
    assert sink.queue_policy == "block" and sink.frames_written == 11
    cap = cv2.VideoCapture(str(path))
    frames = []
    while True:
        ok, img = cap.read()
        if not ok:
            break
        frames.append(img)
    cap.release()
    assert len(frames) == 11
    img = frames[5]
    assert img.shape == (H * 8, W * 8, 3)
    s = 8
    a = img[8 * s : 8 * s + 4, 11 * s : 11 * s + 4].reshape(-1, 3).mean(0)  # inside class-1 block
    b = img[24 * s : 24 * s + 4, 30 * s : 30 * s + 4].reshape(-1, 3).mean(0)  # inside class-2 block
    bg = img[16 * s : 16 * s + 4, 2 * s : 2 * s + 4].reshape(-1, 3).mean(0)  # background
    assert np.abs(a - _blend(1)).max() < 20 and np.abs(b - _blend(2)).max() < 20  # lossy codec
    assert np.abs(bg - np.asarray(BACKGROUND)).max() < 12


def test_png_frames_are_exact(tmp_path: Path) -> None:
    out = tmp_path / "frames"
    items = [_result(i, 25_000, _mask_a()) for i in range(8)]  # 200 ms at 20 fps -> 4 frames
    cfg = build(OverlayConfig, {"fps": 20, "show_hud": False, "scale": 2})
    _run(OverlaySink(cfg, str(out) + "/", gui=NO_GUI), items)
    files = sorted(out.glob("frame_*.png"))
    assert [f.name for f in files] == [f"frame_{k:06d}.png" for k in range(4)]
    img = cv2.imread(str(files[2]))
    assert img.shape == (H * 2, W * 2, 3)
    lit = np.zeros((H, W), bool)
    lit[4:12, 6:16] = True
    native = img[::2, ::2]
    inner = np.zeros((H, W), bool)
    inner[5:12, 7:16] = True  # row 4 / column 6 carry the instance box outline
    assert (native[inner] == _blend(1)).all()
    # instance box outline in class colour on the block's top-left corner pixel
    assert tuple(img[4 * 2, 6 * 2]) == class_color(1)
    quiet = ~lit
    assert (native[lit & ~inner] == class_color(1)).all()  # the outline itself
    quiet[H - 1, :] = False  # the event row
    quiet[:4, 4:20] = False  # the instance label "#1" above the box
    assert (native[quiet] == BACKGROUND).all()
    # ON event (x=1) is light blue, OFF (x=3) orange, in the frame they happened
    ev0 = cv2.imread(str(files[0]))[::2, ::2]
    assert ev0[H - 1, 1, 0] > 200 and ev0[H - 1, 3, 2] > 200


def test_reset_starts_a_new_segment(tmp_path: Path) -> None:
    out = tmp_path / "seg"
    first = [_result(i, 10_000, _mask_a()) for i in range(10)]  # 100 ms at 30 fps -> 3 frames
    second = [_result(i, 10_000, _mask_b(), t_start=0) for i in range(5)]  # rewinds: 50 ms -> 2 frames
    sink = _run(OverlaySink(build(OverlayConfig, {"show_hud": False}), str(out) + "/", gui=NO_GUI),
                [*first, StreamReset("loop"), *second])
    assert sink.frames_written == 5 and len(list(out.glob("*.png"))) == 5


def test_hud_is_drawn(tmp_path: Path) -> None:
    outs = {}
    for hud in (False, True):
        d = tmp_path / f"hud{hud}"
        _run(OverlaySink(build(OverlayConfig, {"show_hud": hud}), str(d) + "/", gui=NO_GUI),
             [_result(i, 10_000, _mask_a()) for i in range(4)])
        outs[hud] = cv2.imread(str(d / "frame_000000.png"))
    band = (slice(0, 14), slice(0, 200))
    assert (outs[True][band] > 200).any() and not (outs[False][band] > 200).any()


def test_existing_outputs_are_never_overwritten(tmp_path: Path) -> None:
    video = tmp_path / "v.mp4"
    video.write_bytes(b"keep")
    sink = OverlaySink(OverlayConfig(), str(video), gui=NO_GUI)
    with pytest.raises(NodeError) as ei:
        sink.open(_ctx())
    sink.close()
    assert str(video) in str(ei.value) and "--overwrite" in str(ei.value) and video.read_bytes() == b"keep"
    pngs = tmp_path / "p"
    pngs.mkdir()
    (pngs / "frame_000000.png").write_bytes(b"keep")
    with pytest.raises(NodeError, match="--overwrite"):
        OverlaySink(OverlayConfig(), str(pngs), gui=NO_GUI).open(_ctx())
    _run(OverlaySink(build(OverlayConfig, {"overwrite": True}), str(video), gui=NO_GUI),
         [_result(i, 40_000, _mask_a()) for i in range(3)])
    assert cv2.VideoCapture(str(video)).read()[0]


def test_bare_overlay_without_display_writes_into_the_run_folder(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    sink = SINKS["overlay"].factory(None, Config({"overlay": OverlayConfig()}))
    assert sink.mode == "video" and sink.queue_policy == "block"
    _run(sink, [_result(i, 40_000, _mask_a()) for i in range(3)], run_dir=tmp_path)
    assert (tmp_path / "overlay.mp4").is_file()
    assert str(tmp_path / "overlay.mp4") in capsys.readouterr().err
    with pytest.raises(UsageError, match="overlay window impossible"):
        OverlaySink(OverlayConfig(), "window")


def test_video_is_playable_after_an_error(tmp_path: Path) -> None:
    path = tmp_path / "e.avi"
    sink = OverlaySink(build(OverlayConfig, {"show_hud": False}), str(path), gui=NO_GUI)
    sink.open(_ctx())
    for i in range(10):
        sink.process(_result(i, 10_000, _mask_a()))
    sink.close()  # as the engine does after an error elsewhere
    sink.close()
    cap = cv2.VideoCapture(str(path))
    n = 0
    while cap.read()[0]:
        n += 1
    assert n == 3  # 100 ms at 30 fps


def test_window_mode_keys_and_queue_policy() -> None:
    sink = OverlaySink(OverlayConfig(), "window", gui=(True, ""))
    assert sink.queue_policy == "drop_oldest"
    resets: list[str] = []
    pauses: list[bool] = []
    ctx = RunContext(stop=threading.Event(), metrics=Metrics(), request_reset=resets.append,
                     request_pause=pauses.append)
    sink._ctx = ctx  # keys only; opening a real window needs a display
    sink.handle_key(ord(" "))
    sink.handle_key(ord(" "))
    sink.handle_key(ord("r"))
    assert pauses == [True, False] and resets == ["user pressed r"] and not ctx.stop.is_set()
    sink.handle_key(ord("q"))
    assert ctx.stop.is_set()


def test_config_and_targets() -> None:
    for bad in ({"fps": 0}, {"scale": 99}, {"decay_ms": -1}, {"alpha": 2}):
        with pytest.raises(UsageError):
            build(OverlayConfig, bad)
    with pytest.raises(UsageError, match="not understood"):
        OverlaySink(OverlayConfig(), "out.gif", gui=NO_GUI)
    assert OverlaySink(OverlayConfig(), "x.avi", gui=NO_GUI).mode == "video"
