"""MemoryTracker (CPU mode) measures what it claims: tensor storages allocated inside the context."""

import ctypes
import ctypes.util
import threading

import pytest
import torch
import torch.nn.functional as F

from engine.memory import MemoryTracker, peak_rss_bytes

MB = 1_000_000


def fbytes(*shape: int) -> int:
    """Bytes of a float32 tensor of this shape."""
    n = 1
    for s in shape:
        n *= s
    return 4 * n


def test_peak_and_current_after_free():
    with MemoryTracker("cpu") as mt:
        a = torch.ones(10 * MB)  # 40 MB
        assert mt.current_bytes == pytest.approx(40 * MB, rel=0.01)
        del a
        assert mt.current_bytes == 0  # finalizer fired as soon as the storage died
        b = torch.ones(5 * MB)  # 20 MB
    assert mt.peak_bytes == pytest.approx(40 * MB, rel=0.01)
    assert mt.current_bytes == pytest.approx(20 * MB, rel=0.01)
    del b
    assert mt.current_bytes == 0  # still tracked after exit


def test_preexisting_views_and_inplace_not_counted():
    a = torch.ones(1000, 1000)
    with MemoryTracker("cpu") as mt:
        v = a.view(-1)[::2]  # views of a storage alive before entering
        t = a.t()
        a.mul_(2)  # in-place on pre-existing storage
        a[0].fill_(3)  # (a[0] = 3 would count: it materialises a 4-byte scalar tensor)
        v.add_(1)
        torch.add(a, 1, out=a)
    assert mt.peak_bytes == 0 and mt.current_bytes == 0

    with MemoryTracker("cpu") as mt:
        x = torch.zeros(1000, 1000)  # 4 MB, new
        views = [x.view(-1), x[1:], x.t(), x.unsqueeze(0), x.detach()]
        x.add_(1).mul_(3)
        views[0].sub_(1)
        y = x + 1  # a real new allocation
    assert mt.current_bytes == mt.peak_bytes == 2 * fbytes(1000, 1000)
    del x, views, v, t, y


def test_python_data_and_meta_and_sparse():
    with MemoryTracker("cpu") as mt:
        t = torch.tensor([1.0] * 1000)  # built outside the dispatcher, then lift_fresh
        m = torch.empty(10 * MB, device="meta")  # no memory behind it
        z = torch.empty(0)
        n = torch.ones(3).sum().item()  # non-tensor output
    assert mt.current_bytes == fbytes(1000) + fbytes(0) and mt.peak_bytes >= fbytes(1000)
    assert m.shape[0] == 10 * MB and z.numel() == 0 and n == 3.0

    dense = torch.eye(1000)
    with MemoryTracker("cpu") as mt:
        sp = dense.to_sparse()  # 1000 nnz: int64 indices (2 x 1000) + float values
    assert mt.current_bytes == 2 * 8 * 1000 + 4 * 1000
    del sp, t


def test_backward_allocations_counted():
    torch.manual_seed(0)
    B, D = 256, 1024
    lin1, lin2 = torch.nn.Linear(D, D), torch.nn.Linear(D, D)
    x = torch.randn(B, D)
    with MemoryTracker("cpu") as mt:
        # Keep every activation referenced so all are alive when the last gradient lands.
        h = lin1(x)
        a = F.relu(h)
        out = lin2(a)
        loss = out.square().mean()
        loss.backward()
    acts = 3 * fbytes(B, D)
    grads = sum(p.grad.numel() * 4 for p in (*lin1.parameters(), *lin2.parameters()))
    assert mt.peak_bytes >= acts + grads
    assert mt.peak_bytes < acts + grads + 4 * fbytes(B, D) + 3 * fbytes(D, D)  # not wildly over
    assert mt.current_bytes >= acts + grads  # grads live on in .grad
    del h, a, out, loss

    # Only the backward inside the context: the gradient (allocated by the autograd engine) is seen.
    w = torch.randn(2048, 2048, requires_grad=True)
    loss = (w @ torch.randn(2048, 64)).sum()
    with MemoryTracker("cpu") as mt:
        loss.backward()
    assert mt.peak_bytes >= fbytes(2048, 2048)


def test_frees_inside_backward_are_prompt():
    # Backward of y = x * 2 * 2 * ... makes a fresh 4 MB gradient per step and drops the previous one.
    # If finalizers were deferred to the end of backward, the peak would be ~steps * 4 MB.
    x = torch.randn(1000, 1000, requires_grad=True)
    y = x
    for _ in range(10):
        y = y * 2
    with MemoryTracker("cpu") as mt:
        y.backward(torch.ones_like(y))
    g = fbytes(1000, 1000)
    assert mt.peak_bytes >= 2 * g  # the seed gradient plus at least one step's output
    assert mt.peak_bytes <= 4 * g


def test_free_in_other_thread():
    with MemoryTracker("cpu") as mt:
        box = [torch.ones(MB)]
    assert mt.current_bytes == fbytes(MB)
    th = threading.Thread(target=box.clear)  # the storage dies, and its finalizer runs, on that thread
    th.start()
    th.join()
    assert mt.current_bytes == 0 and mt.peak_bytes == fbytes(MB)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_mode():
    keep = torch.ones(MB, device="cuda")  # live on entry: not counted
    with MemoryTracker("cuda") as mt:
        a = torch.ones(10 * MB, device="cuda")
        del a
        b = torch.ones(5 * MB, device="cuda")
    assert mt.peak_bytes == pytest.approx(40 * MB, rel=0.01)
    assert mt.current_bytes == pytest.approx(20 * MB, rel=0.01)
    del b, keep


def test_peak_grows_with_sequence_length_tiny_llama():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)

    def peak(seq_len: int) -> int:
        ids = torch.randint(3, 256, (1, seq_len))
        model.zero_grad(set_to_none=True)
        with MemoryTracker("cpu") as mt:
            model(input_ids=ids, labels=ids).loss.backward()
        return mt.peak_bytes

    peak(32)  # warm-up: lazy caches are not what we're measuring
    p256, p512 = peak(256), peak(512)
    assert p256 > 256 * 256 * 4  # at least the logits
    assert p512 > 1.8 * p256, (p256, p512)


def _mallinfo2():
    path = ctypes.util.find_library("c")
    libc = ctypes.CDLL(path) if path else None
    if libc is None or not hasattr(libc, "mallinfo2"):
        pytest.skip("needs glibc >= 2.33 (mallinfo2)")

    class Mallinfo2(ctypes.Structure):
        _fields_ = [
            (name, ctypes.c_size_t)
            for name in (
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()
            )
        ]

    libc.mallinfo2.restype = Mallinfo2

    def in_use() -> int:
        m = libc.mallinfo2()
        return m.uordblks + m.hblkhd  # bytes in malloc'd chunks + bytes in mmap'd chunks

    return in_use


def test_matches_glibc_malloc_accounting():
    in_use = _mallinfo2()
    with MemoryTracker("cpu") as mt:
        before = in_use()
        a = torch.ones(16 * MB)  # 64 MB: big enough to dwarf other allocations in between
        grown = in_use() - before
        tracked = mt.current_bytes
        del a
        shrunk = grown - (in_use() - before)
    assert tracked == pytest.approx(grown, rel=0.10), (tracked, grown)
    assert mt.current_bytes == 0
    assert shrunk == pytest.approx(tracked, rel=0.10), (shrunk, tracked)


def test_peak_rss_bytes_plausible():
    rss = peak_rss_bytes()
    a = torch.ones(64 * MB)  # 256 MB touched: peak RSS must have grown if it wasn't already that high
    assert peak_rss_bytes() >= max(rss, a.numel() * 4)
    assert peak_rss_bytes() < 1 << 40
