"""The bucketed refit protocol without engines: buckets hold at most bucket_bytes (an oversized
tensor travels alone), every dtype and shape comes back bit-exact, the sender reuses one buffer
(two, alternating, when the engine reads views) and refills one only after the bucket in it was
released, what a loader holds past a release is copied out first, and the sender's extra memory is
about one bucket where cloning the model costs the model."""
from __future__ import annotations

import os
import threading
import time

import pytest
import torch

from megatron_denoise.rollout.refit import BucketStream, PeakRSS, stream_buckets


def named():
    g = torch.Generator().manual_seed(0)
    return [("a", torch.randn(3, 5, generator=g)), ("b", torch.randn(7, generator=g).to(torch.bfloat16)),
            ("c", torch.arange(11)), ("big", torch.randn(300, generator=g)), ("d", torch.randn(2, 2, generator=g))]


@pytest.mark.parametrize("transport", ["shm", "object"])
def test_buckets_round_trip_every_dtype_and_respect_the_size(transport):
    src = named()
    buckets = []
    for b in stream_buckets(iter(src), bucket_bytes=256, transport=transport):
        assert b.nbytes <= 256 or [e[0] for e in b.entries] == ["big"]          # 1200 B: alone
        buckets.append([(n, t.clone()) for n, t in b.tensors()])               # consume before the next
    got = [nt for b in buckets for nt in b]
    assert [n for n, _ in got] == [n for n, _ in src]
    for (n, t), (_, w) in zip(got, src):
        assert t.dtype == w.dtype and t.shape == w.shape and torch.equal(t, w), n
    assert not [f for f in os.listdir("/dev/shm") if f.startswith(f"mdn-refit-{os.getpid()}-")]  # cleaned up


def test_a_gpu_bucket_is_released_only_after_the_engine_copies_ran(monkeypatch):
    """The engine's copies out of a CUDA IPC buffer are only queued on its stream when the loader
    has them; the sender refills on its own stream. The device is synchronised BEFORE the sender
    is told the bucket is consumed (this machine has no GPU: torch.cuda.synchronize is recorded)."""
    from types import SimpleNamespace

    from megatron_denoise.rollout.refit import _release

    consumed, calls = threading.Event(), []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda d: calls.append((d, consumed.is_set())))
    _release(consumed, SimpleNamespace(is_cuda=True, device=torch.device("cuda", 1)))   # a copy on GPU 1
    assert calls == [(torch.device("cuda", 1), False)] and consumed.is_set()
    for copy in (torch.zeros(2), None):                                         # host copies, an empty bucket
        host = threading.Event()
        _release(host, copy)
        assert host.is_set() and len(calls) == 1


def test_a_gpu_sender_syncs_its_fill_before_it_shares_the_buffer(monkeypatch):
    """The sender's fill of a CUDA buffer is queued on its stream; a receiver that finds the reused
    buffer in torch's IPC cache does not wait on the IPC event. The stream is synchronised BEFORE
    the handle is made (recorded here: no GPU)."""
    from types import SimpleNamespace

    import torch.multiprocessing.reductions as reductions

    from megatron_denoise.rollout.refit import RefitBuffers

    calls = []
    monkeypatch.setattr(torch.cuda, "current_stream",
                        lambda d: SimpleNamespace(synchronize=lambda: calls.append(("sync", d))))
    monkeypatch.setattr(reductions, "reduce_tensor", lambda t: calls.append(("share", t.device)) or ("rebuild", ()))
    flat = SimpleNamespace(is_cuda=True, device=torch.device("cuda", 1))
    assert RefitBuffers("shm").payload(flat, None, 8) == {"kind": "ipc", "handle": ("rebuild", ())}
    assert calls == [("sync", torch.device("cuda", 1)), ("share", torch.device("cuda", 1))]


def test_cuda_tensors_are_staged_on_their_gpu_only_for_the_colocated_transport():
    """"shm" (colocated replica, same GPU): the bucket stays on the tensors' GPU and travels as a CUDA
    IPC handle; "object" (replicas on other GPUs or nodes, rollout.colocate false): a host copy,
    since an IPC handle cannot be opened elsewhere (tests/gpu checks the payloads on a GPU)."""
    from megatron_denoise.rollout.refit import RefitBuffers

    gpu = torch.device("cuda", 1)
    assert RefitBuffers("shm").device_for(gpu) == gpu
    assert RefitBuffers("object").device_for(gpu) == torch.device("cpu")
    assert RefitBuffers("shm").device_for(torch.device("cpu")) == torch.device("cpu")


@pytest.mark.parametrize("receive", ["copy", "copy_ahead", "views"])
def test_reused_buffers_are_refilled_only_after_their_bucket_was_released(receive):
    """Ten 256-byte tensors in 512-byte buckets (w0 w1 | w2 w3 | ...). The loader holds on to every
    tensor until the end, as vLLM's layer-wise reload holds those of an incomplete layer; with views
    the stream's release hook copies them out of a buffer before the buffer goes back."""
    src = [(f"w{i}", torch.full((64,), float(i))) for i in range(10)]
    stream = BucketStream(receive)
    held, order, mapped = [], [], {}
    second_pushed = threading.Event()

    def copy_out(buffer):                                  # the engine's _privatize_held, for this loader
        order.append(("release", buffer.data_ptr()))
        for i, (n, t) in enumerate(held):
            if t.untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr():
                held[i] = (n, t.clone())

    stream.on_release = copy_out

    def loader():
        for n, t in stream:
            if n == "w0":  # copy-ahead and views let the sender fill bucket 2 before bucket 1 loads
                order.append(("second pushed before the first load", second_pushed.wait(0.5 if receive == "copy" else 5)))
            time.sleep(0.01)
            held.append((n, t))
            order.append(("load", n))

    th = threading.Thread(target=loader)
    th.start()
    for b in stream_buckets(iter(src), bucket_bytes=512, transport="shm", buffers=2 if receive == "views" else 1):
        mapped[b.entries[0][0]] = b.payload["path"]
        order.append(("push", b.entries[0][0]))
        if b.entries[0][0] == "w2":
            second_pushed.set()
        stream.push(b)
        order.append(("returned", b.entries[0][0]))
    stream.close()
    th.join()
    assert [(n, float(t[0])) for n, t in held] == [(f"w{i}", float(i)) for i in range(10)]  # no refilled buffer read
    assert all(bool((t == float(n[1:])).all()) for n, t in held)
    assert len(set(mapped.values())) == (2 if receive == "views" else 1) and stream.buckets == 5
    assert ("second pushed before the first load", receive != "copy") in order
    pos = order.index
    for k in range(3):  # the buffer of bucket k is refilled (bucket k + 1 or k + 2) only after bucket k was released
        first, last, refill = f"w{2 * k}", f"w{2 * k + 1}", f"w{2 * k + (4 if receive == 'views' else 2)}"
        if receive == "views":
            assert pos(("load", last)) < pos(("returned", f"w{2 * k + 2}")) < pos(("push", refill))
            assert ("returned", f"w{2 * k + 2}") in order
        elif receive == "copy":
            assert pos(("load", last)) < pos(("returned", first)) < pos(("push", refill))
        else:
            assert pos(("returned", first)) < pos(("push", refill))
    releases = [e for e in order if e[0] == "release"]
    assert len(releases) == (5 if receive == "views" else 0)


def test_views_without_the_release_hook_would_read_refilled_buffers():
    """The hook is what makes views safe: without it, a tensor held past its bucket's release shows
    the values of a later bucket (the sender refilled the buffer)."""
    src = [(f"w{i}", torch.full((64,), float(i))) for i in range(10)]
    stream = BucketStream("views")
    held = []
    th = threading.Thread(target=lambda: held.extend(stream))
    th.start()
    for b in stream_buckets(iter(src), bucket_bytes=512, transport="shm", buffers=2):
        stream.push(b)
    stream.close()
    th.join()
    assert [n for n, _ in held] == [f"w{i}" for i in range(10)]
    assert [float(t[0]) for _, t in held] != [float(i) for i in range(10)]


def test_a_one_buffer_sender_is_held_until_its_bucket_is_released_whatever_the_receiver_reads():
    """Each bucket says how many buffers its sender alternates: a one-buffer sender (a tool's
    refit) into a views receiver waits until its bucket was loaded, so it never refills a buffer
    the engine reads."""
    src = [(f"w{i}", torch.full((64,), float(i))) for i in range(6)]
    stream = BucketStream("views")
    order = []
    th = threading.Thread(target=lambda: [order.append(("load", n)) or time.sleep(0.01) for n, _ in stream])
    th.start()
    for b in stream_buckets(iter(src), bucket_bytes=512, transport="shm", buffers=1):
        assert b.ring == 1
        stream.push(b)
        order.append(("returned", b.entries[-1][0]))
    stream.close()
    th.join()
    for k in range(3):
        assert order.index(("load", f"w{2 * k + 1}")) < order.index(("returned", f"w{2 * k + 1}"))


@pytest.mark.parametrize("receive", ["copy", "copy_ahead", "views"])
def test_an_engine_that_fails_mid_bucket_releases_its_sender(receive):
    """The loader raises on the second tensor of a bucket (an HF name the engine does not know),
    as the replica's load thread sees it: its generator stays suspended in that bucket (the
    exception's traceback holds it), so no release would come. `fail` makes the sender's push raise
    at once, and the drain lets the replica's refit_end finish."""
    src = [(f"w{i}", torch.full((64,), float(i))) for i in range(10)]
    stream = BucketStream(receive)

    def loader():
        it = iter(stream)                   # held by this frame, as vLLM's loader frames hold theirs
        try:
            for n, _ in it:
                if n == "w3":
                    raise ValueError("no parameter for w3")
        except ValueError as e:
            stream.fail(e)
            for _ in stream:
                pass

    def sender():
        try:
            for b in stream_buckets(iter(src), bucket_bytes=512, transport="shm",
                                    buffers=2 if receive == "views" else 1):
                stream.push(b)
                pushed.append(b.entries[0][0])
        except RuntimeError as e:
            raised.append(str(e))

    pushed, raised = [], []
    threads = [threading.Thread(target=loader, daemon=True), threading.Thread(target=sender, daemon=True)]
    [t.start() for t in threads]
    threads[1].join(20)                     # (a hang fails here instead of stalling the run)
    assert not threads[1].is_alive(), f"the sender still waits for a release after {pushed}"
    assert len(raised) == 1 and "the engine stopped loading" in raised[0] and "no parameter for w3" in raised[0]
    assert len(pushed) <= 3
    stream.close()
    threads[0].join(20)
    assert not threads[0].is_alive()


def test_an_oversized_tensor_buffer_outlives_its_bucket_until_released():
    """A tensor larger than a bucket travels in a file of its own. With two buffers in turn, asking
    for the next bucket releases all but the last yielded one: big's file stays while "w" is out,
    and goes when "x" is asked for. With one buffer it goes as soon as the next one is asked for."""
    src = [("big", torch.arange(200.0)), ("w", torch.ones(8)), ("x", torch.ones(8)), ("y", torch.ones(8))]
    gen = stream_buckets(iter(src), bucket_bytes=32, transport="shm", buffers=2)
    big = next(gen)
    assert big.entries[0][0] == "big" and os.path.exists(big.payload["path"])
    assert next(gen).entries[0][0] == "w"
    assert os.path.exists(big.payload["path"])                  # big's bucket may still be loading
    assert torch.equal(dict(big.tensors())["big"], torch.arange(200.0))
    assert next(gen).entries[0][0] == "x"
    assert not os.path.exists(big.payload["path"])
    gen.close()
    gen = stream_buckets(iter(src), bucket_bytes=32, transport="shm", buffers=1)
    big = next(gen)
    assert next(gen).entries[0][0] == "w" and not os.path.exists(big.payload["path"])
    gen.close()


def test_peak_extra_memory_is_about_one_bucket_not_the_model():
    big = torch.randn((48 << 20) // 4)                                          # a 48 MiB "parameter buffer"
    views = [(f"w{i}", big[i * (1 << 18):(i + 1) * (1 << 18)]) for i in range(48)]  # 1 MiB views into it
    bucket = 4 << 20
    with PeakRSS() as streamed:
        for b in stream_buckets(iter(views), bucket_bytes=bucket, transport="object"):
            for _ in b.tensors():
                pass
    with PeakRSS() as cloned:
        # one 48 MiB allocation: above glibc's largest mmap threshold (32 MiB), so it gets fresh pages
        # (1 MiB clones may reuse heap pages earlier tests freed but left resident, hiding the cost)
        copies = torch.cat([t for _, t in views])
    print(f"\nstreaming 48 MiB in 4 MiB buckets: +{streamed.extra_bytes / 2**20:.1f} MiB; "
          f"cloning it: +{cloned.extra_bytes / 2**20:.1f} MiB")
    assert streamed.extra_bytes < 2 * bucket
    assert cloned.extra_bytes > 40 << 20
    del copies


def test_a_kept_pool_reuses_its_files_across_refits_and_deletes_them_at_cleanup():
    """A policy rank keeps its /dev/shm buffers from one refit to the next (no fresh pages to
    fault in); oversized tensors' files still go, and cleanup deletes the rest."""
    from megatron_denoise.rollout.refit import RefitBuffers

    src = [("a", torch.ones(64)), ("big", torch.arange(300.0)), ("b", torch.full((64,), 2.0)),
           ("c", torch.full((64,), 3.0))]
    pool = RefitBuffers("shm")
    seen = []
    for refit in range(2):
        paths = []
        for b in stream_buckets(iter(src), bucket_bytes=512, transport="shm", buffers=2, pool=pool):
            paths.append(b.payload["path"])
            assert [(n, float(t[-1])) for n, t in b.tensors()] == [(n, float(t[-1])) for n, t in src
                                                                  if n in [e[0] for e in b.entries]]
        seen.append(paths)
        assert not os.path.exists(paths[1])                         # big's own file went
        assert all(os.path.exists(p) for p in (paths[0], paths[2]))  # the ring stays
    assert seen[0][0] == seen[1][0] and seen[0][2] == seen[1][2]     # the same files, reused
    assert seen[0][1] != seen[1][1]
    pool.cleanup()
    assert not any(os.path.exists(p) for p in seen[0] + seen[1])
    with pytest.raises(ValueError, match="transport 'shm' given for transport 'object'"):
        next(stream_buckets(iter(src), bucket_bytes=512, transport="object", pool=pool))


def test_files_left_by_a_gone_process_of_this_host_are_swept(tmp_path):
    """A rank killed with its buffers in /dev/shm leaves files named after its host and pid: the
    next rank's pool deletes those of processes that are gone, and no others."""
    import subprocess

    from megatron_denoise.rollout.refit import SHM_PREFIX, host_tag, sweep_stale

    host = host_tag()
    child = subprocess.Popen(["true"])                                # a pid that is gone now
    child.wait()
    gone_pid = child.pid
    names = {"gone": f"{SHM_PREFIX}{host}@{gone_pid}@abcd1234-0",
             "alive": f"{SHM_PREFIX}{host}@{os.getpid()}@abcd1234-0",
             "other_host": f"{SHM_PREFIX}{host}x@{gone_pid}@abcd1234-0",
             "not_ours": f"something-{gone_pid}"}
    for n in names.values():
        (tmp_path / n).write_bytes(b"x")
    assert sweep_stale(host, root=str(tmp_path)) == [str(tmp_path / names["gone"])]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(v for k, v in names.items() if k != "gone")


def test_a_bucket_whose_file_is_gone_fails_loudly_instead_of_loading_zeros():
    """torch.from_file(shared=True) creates a missing file: a bucket whose file another process
    deleted must not map an empty one."""
    gen = stream_buckets(iter([("w", torch.ones(64))]), bucket_bytes=512, transport="shm")
    b = next(gen)
    os.unlink(b.payload["path"])
    with pytest.raises(RuntimeError, match=f"refit bucket file {b.payload['path']}: missing"):
        b.open()
    assert not os.path.exists(b.payload["path"])
    gen.close()
