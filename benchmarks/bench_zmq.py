"""Publish throughput and send->receive latency of the mask.v1 publisher (346x260)."""
import multiprocessing as mp, threading, time
import numpy as np

from stream.events import Instance, MaskResult, SensorSize, Step, make_events
from stream.metrics import Metrics
from stream.node import RunContext
from sinks.zmq_pub import ZmqConfig, ZmqPublisher
from sinks.subscriber import MaskSubscriber

W, H = 346, 260

def masks(n):
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        m = np.zeros((H, W), np.uint8)
        for k in range(3):  # three moving blobs
            x, y = (40 + 90 * k + 2 * i) % (W - 40), (60 + 50 * k + i) % (H - 40)
            m[y:y + 30, x:x + 35] = 1 + k % 2
        out.append(m)
    return out

def sub_main(endpoint, n, q):
    lat = []
    with MaskSubscriber(endpoint) as sub:
        q.put("ready")
        while sub.received < n:
            msg = sub.recv(30)
            if msg is None: break
            now = time.perf_counter_ns()
            sent_ns = int(msg.source) + msg.latency_us * 1000
            lat.append((now - sent_ns) / 1e3)
        q.put((sub.received, sub.missed, lat))

def run(compress, n, pace_hz):
    pub = ZmqPublisher(ZmqConfig(endpoint="tcp://127.0.0.1:*", compress=compress, wait_subscribers=1, hwm=100000))
    ctx = RunContext(stop=threading.Event(), metrics=Metrics())
    pub.open(ctx)
    q = mp.get_context("spawn").Queue()
    p = mp.get_context("spawn").Process(target=sub_main, args=(pub.endpoint, n, q)); p.start()
    q.get(timeout=60); pub.wait_ready(ctx.stop)
    ms = masks(64)
    ev = make_events(np.arange(3000), np.arange(3000) % W, np.arange(3000) % H, np.arange(3000) % 2)
    t = time.perf_counter(); nxt = t
    for i in range(n):
        if pace_hz:
            nxt += 1 / pace_hz
            d = nxt - time.perf_counter()
            if d > 0: time.sleep(d)
        c = time.perf_counter_ns()
        st = Step(i, i * 10000, (i + 1) * 10000, None, ev, SensorSize(W, H), c, source=str(c))
        pub.process(MaskResult(st, ms[i % 64], [Instance(1, 1, (0, 0, 10, 10), 100)]))
    dt = time.perf_counter() - t
    got, missed, lat = q.get(timeout=120); p.join(); pub.close()
    ls = ctx.metrics.latency_stats("latency.send")
    lat = np.array(lat)
    return n / dt, got, missed, np.percentile(lat, 50), np.percentile(lat, 99), ls["p50_ms"] * 1e3, ls["p99_ms"] * 1e3

if __name__ == "__main__":
    for compress in (True, False):
        r = run(compress, 5000, 0)
        print(f"compress={compress}: throughput {r[0]:8.0f} msg/s unpaced (received {r[1]}, missed {r[2]}); "
              f"bin close->send p50 {r[5]:.0f} us p99 {r[6]:.0f} us")
        r = run(compress, 2000, 200)
        print(f"compress={compress}: at 200 msg/s send->receive+decode (other process) p50 {r[3]:.0f} us p99 {r[4]:.0f} us; "
              f"bin close->send p50 {r[5]:.0f} us p99 {r[6]:.0f} us")
