"""Kernel alternatives for improved-bn's first layer, timed side by side (the profile in benchmarks/results.md).

conv 1 -> 20, 5x5 on 28x28 (oneDNN against an as_strided im2col + matmul), its input gradient
(convolution_backward against matmul + 25 shifted adds), and 2x2 max-pool on NCHW against
channels-last. Each pair is checked to agree before it is timed.

    python benchmarks/kernels.py [--threads 2] [--batch 1000]
"""

import argparse
import time

import torch
import torch.nn.functional as F


def timed(fn, reps: int = 5) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - start) / reps * 1000


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=1000)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    n = args.batch
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, 1, 28, 28, generator=g)
    w, b = torch.randn(20, 1, 5, 5, generator=g), torch.randn(20, generator=g)

    def conv_onednn():
        return F.conv2d(x, w, b)

    def conv_im2col():
        cols = x.as_strided((n, 24, 24, 5, 5), (784, 28, 1, 28, 1)).reshape(n * 576, 25)
        return torch.addmm(b, cols, w.view(20, 25).t()).view(n, 24, 24, 20).permute(0, 3, 1, 2)

    grad = torch.randn(n, 20, 24, 24, generator=g)
    grad_cl = grad.permute(0, 2, 3, 1).contiguous()

    def input_grad_aten():
        return torch.ops.aten.convolution_backward(grad, x, w, None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1,
                                                   [True, False, False])[0]

    def input_grad_matmul():
        cols = (grad_cl.view(n * 576, 20) @ w.view(20, 25)).view(n, 24, 24, 5, 5)
        out = torch.zeros(n, 28, 28)
        for i in range(5):
            for j in range(5):
                out[:, i:i + 24, j:j + 24] += cols[..., i, j]
        return out.view(n, 1, 28, 28)

    h = conv_onednn()
    h_cl = h.contiguous(memory_format=torch.channels_last)
    pairs = [("conv1 forward", conv_onednn, "oneDNN", conv_im2col, "im2col + matmul"),
             ("conv1 input gradient", input_grad_aten, "convolution_backward", input_grad_matmul, "matmul + shifted adds"),
             ("max-pool 2x2", lambda: F.max_pool2d(h, 2, return_indices=True)[0], "NCHW",
              lambda: F.max_pool2d(h_cl, 2, return_indices=True)[0], "channels-last")]
    print(f"batch {n}, {args.threads} thread(s)")
    for what, a, a_name, b_fn, b_name in pairs:
        diff = (a() - b_fn()).abs().max().item()
        ta, tb = timed(a), timed(b_fn)
        print(f"{what:<22} {a_name:<22} {ta:7.1f} ms   {b_name:<22} {tb:7.1f} ms   ratio {ta / tb:4.2f}   max diff {diff:.1e}")


if __name__ == "__main__":
    main()
