"""SCAE autograd kernels against dense float64 references and gradcheck."""

import pytest
import torch


@pytest.mark.parametrize("heads", [None, 3])
def test_connect_matches_a_dense_masked_product(heads):
    """Summing connected source codes (a sparse product over the connected, active columns only)
    equals x @ M^T with the dense connection matrix M, in value and in the gradients of the weights
    and of the active source values."""
    from dictionary_learning.scae.kernels import connect

    generator = torch.Generator().manual_seed(5)
    sizes, n_features, C, tokens = [7, 5, 9], 6, 4, 10
    n_sources = sum(sizes)
    sources = [torch.randn(tokens, n, generator=generator, dtype=torch.float64)
                * (torch.rand(tokens, n, generator=generator) < 0.3) for n in sizes]
    indices = torch.stack([torch.randperm(n_sources, generator=generator)[:C]
                           for _ in range(n_features)])
    shape = (n_features, C) if heads is None else (n_features, C, heads)
    weights = torch.randn(*shape, generator=generator, dtype=torch.float64, requires_grad=True)
    leaves = [x.clone().requires_grad_(True) for x in sources]
    got = connect(leaves, indices, weights)

    reference_weights = weights.detach().clone().requires_grad_(True)
    reference_leaves = [x.clone().requires_grad_(True) for x in sources]
    x = torch.cat(reference_leaves, dim=1)  # [tokens, n_sources]
    dense = torch.zeros(n_features, n_sources, *shape[2:], dtype=torch.float64)
    dense = dense.index_put((torch.arange(n_features)[:, None].expand(-1, C), indices),
                            reference_weights)
    expected = torch.einsum("tj,fj...->tf...", x, dense)
    torch.testing.assert_close(got, expected)
    cotangent = torch.randn(expected.shape, generator=generator, dtype=torch.float64)
    (got * cotangent).sum().backward()
    (expected * cotangent).sum().backward()
    torch.testing.assert_close(weights.grad, reference_weights.grad)
    for ours, theirs, x in zip(leaves, reference_leaves, sources):
        active = x != 0  # the gradient of TopK codes only matters where they are active
        torch.testing.assert_close(ours.grad[active], theirs.grad[active])


@pytest.mark.parametrize("shared", [True, False])
def test_gather_dot_gradients(shared, monkeypatch):
    """The blocked gather-and-dot behind the virtual weights: forward against a direct einsum,
    backward with gradcheck (blocks of 2 rows, so several blocks and index_add collisions are
    exercised)."""
    from dictionary_learning.scae.kernels import GatherDot

    monkeypatch.setattr(GatherDot, "CHUNK", 2)
    generator = torch.Generator().manual_seed(7)
    A = torch.randn(5, 3, 4, generator=generator, dtype=torch.float64, requires_grad=True)
    B = torch.randn(*((6, 4) if shared else (6, 3, 4)), generator=generator, dtype=torch.float64,
                    requires_grad=True)
    index = torch.randint(6, (5, 3), generator=generator)
    expected = torch.einsum("fhd,fcd->fch" if shared else "fhd,fchd->fch", A, B[index])
    torch.testing.assert_close(GatherDot.apply(A, B, index), expected)
    assert torch.autograd.gradcheck(lambda a, b: GatherDot.apply(a, b, index), (A, B))
