"""The sparse kernels of the TopK path (`dictionary_learning/sparse.py`) with gradcheck on tiny
float64 shapes."""

import torch

from dictionary_learning.sparse import SparseCode, gather_linear, sparse_decode


def test_sparse_kernels_gradcheck():
    generator = torch.Generator().manual_seed(4)
    x = torch.randn(5, 4, dtype=torch.float64, generator=generator, requires_grad=True)
    weight = torch.randn(6, 4, dtype=torch.float64, generator=generator, requires_grad=True)
    bias = torch.randn(6, dtype=torch.float64, generator=generator, requires_grad=True)
    rows, cols = torch.tensor([0, 0, 1, 3, 3, 3]), torch.tensor([2, 5, 5, 0, 1, 5])
    assert torch.autograd.gradcheck(lambda x, w, b: gather_linear(x, w, b, rows, cols),
                                    (x, weight, bias))
    values = torch.randn(6, dtype=torch.float64, generator=generator, requires_grad=True)
    decoder = torch.randn(4, 6, dtype=torch.float64, generator=generator, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v, d: sparse_decode(SparseCode(v, rows, cols, 5), d),
                                    (values, decoder))


def test_gather_linear_with_a_center_equals_dense_float64_autograd():
    # values = ((x - c) @ W.T + b)[rows, cols]: the sparse backward's gradients for x, W, b and c
    # (c's as -grad_b @ W) against autograd through the dense product
    generator = torch.Generator().manual_seed(5)
    leaves = [torch.randn(*shape, dtype=torch.float64, generator=generator, requires_grad=True)
              for shape in ((5, 4), (6, 4), (6,), (4,))]
    rows, cols = torch.tensor([0, 0, 1, 3, 3, 4, 4]), torch.tensor([2, 5, 5, 0, 1, 5, 2])
    assert torch.autograd.gradcheck(
        lambda x, w, b, c: gather_linear(x, w, b, rows, cols, center=c), leaves)
    upstream = torch.randn(7, dtype=torch.float64, generator=generator)
    (gather_linear(*leaves[:3], rows, cols, center=leaves[3]) * upstream).sum().backward()
    sparse_grads = [leaf.grad.clone() for leaf in leaves]
    for leaf in leaves:
        leaf.grad = None
    x, w, b, c = leaves
    (((x - c) @ w.T + b)[rows, cols] * upstream).sum().backward()
    for sparse, leaf in zip(sparse_grads, leaves):
        torch.testing.assert_close(sparse, leaf.grad, rtol=1e-12, atol=1e-12)


def test_known_linear_gradients_equal_the_dense_product_in_float64():
    # values computed beforehand (as AuxK takes the dead latents' columns of the encoder GEMM):
    # every gradient as autograd's through (x - c) @ W.T + b, and gradcheck
    from dictionary_learning.sparse import known_linear

    generator = torch.Generator().manual_seed(6)
    leaves = [torch.randn(*shape, dtype=torch.float64, generator=generator, requires_grad=True)
              for shape in ((7, 4), (3, 4), (3,), (4,))]
    x, w, b, c = leaves

    def values():
        with torch.no_grad():
            return (x - c) @ w.T + b

    assert torch.autograd.gradcheck(
        lambda x, w, b, c: known_linear(x, w, b, c, ((x - c) @ w.T + b).detach()), leaves)
    upstream = torch.randn(7, 3, dtype=torch.float64, generator=generator)
    (known_linear(x, w, b, c, values()) * upstream).sum().backward()
    ours = [leaf.grad.clone() for leaf in leaves]
    for leaf in leaves:
        leaf.grad = None
    (((x - c) @ w.T + b) * upstream).sum().backward()
    for mine, leaf in zip(ours, leaves):
        torch.testing.assert_close(mine, leaf.grad, rtol=1e-12, atol=1e-12)
