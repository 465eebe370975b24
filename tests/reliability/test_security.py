"""Catalogue 6, security: loopback by default, CURVE, no pickle execution, capped subscriber,
no silent overwrites, safe YAML."""
from __future__ import annotations

import pickle
import zlib
from pathlib import Path

import msgpack
import pytest
import zmq

from sinks.subscriber import MaskSubscriber
from sinks.wire import REQUIRED_KEYS, SCHEMA, WireError
from sinks.zmq_pub import ZmqConfig, is_loopback, make_curve_keys
from tests.reliability.util import Proc, cli, free_port, rss_mb, small_cfg, video_frames, wait_for, write_cfg


class _Evil:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_zmq_binds_loopback_by_default() -> None:
    assert is_loopback(ZmqConfig().endpoint) and ZmqConfig().endpoint.startswith("tcp://127.0.0.1:")


def test_non_loopback_bind_needs_an_explicit_endpoint_and_warns(tmp_path: Path) -> None:
    r = cli(["-c", str(small_cfg(tmp_path)), "--duration", "0.05", "--sink", f"zmq:tcp://0.0.0.0:{free_port()}"], tmp_path)
    assert r.rc == 0, r.stderr
    warn = [ln for ln in r.stderr.splitlines() if "reachable from other machines" in ln]
    assert len(warn) == 1 and warn[0].startswith("WARNING") and "--zmq-curve" in warn[0]


@pytest.mark.slow
def test_curve_only_authorized_clients_receive(tmp_path: Path) -> None:
    keys = make_curve_keys(tmp_path / "keys", ["alice"])
    intruder = make_curve_keys(tmp_path / "other", ["mallory"])  # a valid keypair, not authorized
    ep = f"tcp://127.0.0.1:{free_port()}"
    cfg = small_cfg(tmp_path, binner={"bin_us": 5000})
    pub = Proc(["-c", str(cfg), "--realtime", "--duration", "2", "--sink", f"zmq:{ep}",
                "--zmq-curve", str(tmp_path / "keys"), "--wait-subscribers", "1"], tmp_path)
    plain = MaskSubscriber(ep)
    bad = MaskSubscriber(ep, curve_server_key=keys.server_public, curve_client_key=intruder.clients["mallory"])
    try:
        with MaskSubscriber(ep, curve_server_key=keys.server_public, curve_client_key=keys.clients["alice"]) as ok:
            got = [ok.recv(30) for _ in range(20)]
        assert all(m is not None for m in got)
        assert plain.recv(0.2) is None and bad.recv(0.2) is None
        assert plain.received == 0 and bad.received == 0
        r = pub.finish(timeout=60)
    finally:
        plain.close()
        bad.close()
        pub.kill()
    assert r.rc == 0, r.stderr


def test_cli_refuses_a_malicious_checkpoint_without_running_it(tmp_path: Path) -> None:
    import torch

    marker = tmp_path / "payload_ran"
    evil = tmp_path / "evil.pt"
    from model.checkpoint import FORMAT

    torch.save({"format": FORMAT, "w2": _Evil(str(marker))}, evil)
    raw = tmp_path / "raw.pt"
    raw.write_bytes(pickle.dumps(_Evil(str(marker)), protocol=2))
    for p in (evil, raw):
        r = cli(["-c", str(small_cfg(tmp_path)), "--duration", "0.05", "--weights", str(p),
                 "--sink", f"overlay:{tmp_path / 'v.mp4'}"], tmp_path)
        assert r.rc == 1, r.stderr
        line = r.one_error()
        assert p.name in line and ("refused" in line or "not a SpikeStream checkpoint" in line), line
        assert not marker.exists(), "the pickle payload ran"


def test_yaml_python_tags_are_refused(tmp_path: Path) -> None:
    marker = tmp_path / "yaml_ran"
    bad = tmp_path / "evil.yaml"
    bad.write_text(f'engine: !!python/object/apply:os.system ["touch {marker}"]\n')
    r = cli(["-c", str(bad), "--duration", "0.05"], tmp_path)
    assert r.rc == 2, r.stderr
    assert "evil.yaml" in r.one_error()
    assert not marker.exists()


def _payload(**over) -> bytes:
    msg = {"schema": SCHEMA, "seq": 0, "step": 0, "t0_us": 0, "t1_us": 1000, "width": 4, "height": 2,
           "encoding": "u8", "mask": bytes(8), "n_events": 0, "instances": [], "latency_us": 0, "source": "t"}
    assert set(REQUIRED_KEYS) <= set(msg)
    msg.update(over)
    return msgpack.packb(msg, use_bin_type=True)


def test_subscriber_caps_hostile_messages_and_memory_stays_flat() -> None:
    ctx = zmq.Context()
    pub = ctx.socket(zmq.PUB)
    port = pub.bind_to_random_port("tcp://127.0.0.1")
    ep = f"tcp://127.0.0.1:{port}"
    bomb = zlib.compress(bytes(64 * 1024 * 1024), 9)  # 64 MiB of zeros in ~64 KiB
    hostile = [
        _payload(width=512, height=512, encoding="zlib-u8", mask=bomb),  # inflates past w*h
        _payload(width=100_000, height=100_000),  # side over the cap: refused before allocating
        b"\xdd\x7f\xff\xff\xff" + b"\x00" * 16,  # msgpack array header claiming 2^31 items
        b"\xdf\x7f\xff\xff\xff" + b"\x00" * 16,  # map header claiming 2^31 pairs
        b"\xc6\x7f\xff\xff\xff" + b"\x00" * 16,  # bin header claiming 2 GiB
        _payload(instances=[{}] * 70_000),  # over MAX_INSTANCES
    ]
    try:
        with MaskSubscriber(ep, max_side=512, skip_invalid=True) as sub:
            wait_for(lambda: (pub.send_multipart([b"masks", _payload()]), sub.recv(0.05))[1], 30, "subscriber to join")
            before = rss_mb()
            for _ in range(20):
                for h in hostile:
                    pub.send_multipart([b"masks", h])
            pub.send_multipart([b"masks", _payload(seq=1)])
            good = wait_for(lambda: sub.recv(0.1), 30, "the valid message after the hostile ones")
            assert good.seq == 1 and good.mask.shape == (2, 4)
            assert sub.rejected == 20 * len(hostile), (sub.rejected, sub.last_error)
            grew = rss_mb() - before
            assert grew < 50, f"RSS grew {grew:.0f} MiB"
            assert "\n" not in (sub.last_error or "")
        with MaskSubscriber(ep, max_side=512) as strict:  # without skip_invalid it raises, one line
            wait_for(lambda: (pub.send_multipart([b"masks", _payload()]), strict.recv(0.05))[1], 30, "join")
            pub.send_multipart([b"masks", hostile[1]])
            with pytest.raises(WireError) as e:
                wait_for(lambda: strict.recv(0.1), 30, "the hostile message")
            assert "\n" not in str(e.value)
    finally:
        pub.close(0)
        ctx.term()


# ---- outputs never overwrite an existing file unless --overwrite is given -----------------
OLD = b"precious old content\n"


@pytest.mark.parametrize("kind", ["video", "png_dir", "record"])
def test_outputs_are_not_overwritten_without_flag(tmp_path: Path, kind: str) -> None:
    if kind == "video":
        target, sink = tmp_path / "v.mp4", f"overlay:{tmp_path / 'v.mp4'}"
    elif kind == "png_dir":
        (tmp_path / "frames").mkdir()
        target, sink = tmp_path / "frames" / "frame_000000.png", f"overlay:{tmp_path / 'frames'}/"
    else:
        target, sink = tmp_path / "r.aedat4", f"record:{tmp_path / 'r.aedat4'}"
    target.write_bytes(OLD)
    args = ["-c", str(small_cfg(tmp_path)), "--duration", "0.1", "--sink", sink]
    r = cli(args, tmp_path)
    assert r.rc in (1, 2), r.stderr
    line = r.one_error()
    assert "exists" in line or "already holds" in line
    assert "--overwrite" in line
    assert target.read_bytes() == OLD
    r2 = cli([*args, "--overwrite"], tmp_path)
    assert r2.rc == 0, r2.stderr
    assert target.read_bytes() != OLD
    if kind == "video":
        assert video_frames(target) > 0


def test_stats_json_is_not_overwritten_without_flag(tmp_path: Path) -> None:
    target = tmp_path / "stats.json"
    target.write_bytes(OLD)
    r = cli(["-c", str(small_cfg(tmp_path)), "--duration", "0.05", "--sink", f"overlay:{tmp_path / 'v.mp4'}",
             "--stats-json", str(target)], tmp_path)
    assert target.read_bytes() == OLD
    assert r.rc in (1, 2) and "--overwrite" in r.one_error()


def test_eval_outputs_are_not_overwritten_without_flag(tmp_path: Path) -> None:
    target = tmp_path / "eval.json"
    target.write_bytes(OLD)
    cfg = write_cfg(tmp_path / "c.yaml", {"engine": {"runs_dir": str(tmp_path / "runs"), "status_s": 0},
                                         "synthetic": {"width": 64, "height": 48}})
    from tests.reliability.util import PY, ROOT
    import subprocess

    p = subprocess.run([PY, str(ROOT / "run.py"), "eval", "--config", str(cfg), "--source", "synthetic",
                        "--duration", "0.1", "--json", str(target), "--png", str(tmp_path / "e.png")],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert target.read_bytes() == OLD
    assert p.returncode == 2 and "--overwrite" in p.stderr
