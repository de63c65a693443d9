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
