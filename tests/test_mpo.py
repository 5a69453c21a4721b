import pytest
import tensorly as tl
import torch
from tensorly.tt_matrix import tt_matrix_to_tensor

from mpolab import MPO, decompose

from ._matrices import decaying_matrix


def test_structure_properties():
    mpo = decompose(torch.randn(3072, 768), max_rank=64)
    assert mpo.num_cores == 5 and mpo.central_index == 2
    assert mpo.central_core is mpo.cores[2] and len(mpo.auxiliary_cores) == 4
    assert mpo.shape == (3072, 768) and mpo.padded_shape == (3072, 768)
    assert "ranks=(12, 64, 64, 16)" in repr(mpo)


def test_central_tensor_holds_most_parameters_at_full_rank():
    mpo = decompose(torch.randn(3072, 768))
    assert mpo.central_core.numel() / mpo.num_params > 0.9  # 92.7% for this shape


def test_decompose_returns_mixed_canonical_form_around_the_centre():
    mpo = decompose(decaying_matrix(768, 3072), max_rank=32)
    c = mpo.central_index
    for k, core in enumerate(mpo.cores):
        if k < c:
            A = core.reshape(-1, core.shape[3])
            torch.testing.assert_close(A.T @ A, torch.eye(A.shape[1], dtype=A.dtype), atol=1e-10, rtol=0)
        elif k > c:
            A = core.reshape(core.shape[0], -1)
            torch.testing.assert_close(A @ A.T, torch.eye(A.shape[0], dtype=A.dtype), atol=1e-10, rtol=0)
    # so the central tensor carries the whole norm
    assert float(mpo.central_core.norm()) == pytest.approx(float(mpo.to_matrix().norm()), rel=1e-10)
    assert mpo.norm() == pytest.approx(float(mpo.to_matrix().norm()), rel=1e-10)


@pytest.mark.parametrize("center", [0, 1, 4])
def test_canonicalize_keeps_the_matrix(center):
    mpo = decompose(decaying_matrix(256, 128), max_rank=6)
    torch.testing.assert_close(mpo.canonicalize(center).to_matrix(), mpo.to_matrix(), atol=1e-12, rtol=0)
    with pytest.raises(ValueError, match="center"):
        mpo.canonicalize(7)


def test_truncate_after_training_like_perturbation():
    W = decaying_matrix(768, 3072, decay=0.3)
    mpo = decompose(W, max_rank=64)
    # perturb the cores as training would: the gauge is no longer canonical
    trained = MPO([c + 0.01 * torch.randn_like(c) for c in mpo.cores], *mpo.shape)
    small = trained.truncate(max_rank=16)
    assert max(small.ranks) <= 16
    err = float((small.to_matrix() - trained.to_matrix()).norm() / trained.to_matrix().norm())
    assert small.truncation_error == pytest.approx(err, rel=1e-6)
    # TT rounding of a canonicalised MPO equals a fresh TT-SVD of its matrix at the same caps
    fresh = decompose(trained.to_matrix(), max_rank=16)
    assert err == pytest.approx(fresh.truncation_error, rel=1e-6)


def test_truncate_with_tolerance_and_budget():
    mpo = decompose(decaying_matrix(512, 512, decay=0.05))
    small = mpo.truncate(rel_tol=0.1)
    assert small.truncation_error <= 0.1 and small.num_params < mpo.num_params
    assert mpo.truncate(max_params=5000).num_params <= 5000
    assert mpo.truncate(max_rank=1000).ranks == mpo.ranks  # never raises a bond


def test_tensorly_round_trip_in_both_backends():
    mpo = decompose(torch.randn(96, 120, dtype=torch.float64), max_rank=5, num_cores=3)
    previous = tl.get_backend()
    try:
        for backend in ["numpy", "pytorch"]:
            tl.set_backend(backend)
            tt = mpo.to_tensorly()
            dense = torch.as_tensor(tl.to_numpy(tt_matrix_to_tensor(tt))).reshape(96, 120)
            torch.testing.assert_close(dense, mpo.to_matrix())
            back = MPO.from_tensorly(tt)
            torch.testing.assert_close(back.to_matrix(), mpo.to_matrix())
    finally:
        tl.set_backend(previous)


def test_from_tensorly_slices_padding():
    mpo = decompose(torch.randn(1009, 16, dtype=torch.float64), num_cores=2)
    back = MPO.from_tensorly(mpo.to_tensorly(), out_features=1009, in_features=16)
    torch.testing.assert_close(back.to_matrix(), mpo.to_matrix())


@pytest.mark.parametrize(
    "cores, match",
    [
        ([torch.randn(1, 2, 2)], "4-D"),
        ([torch.randn(2, 2, 2, 1)], "boundary"),
        ([torch.randn(1, 2, 2, 3), torch.randn(4, 2, 2, 1)], "bond 0"),
    ],
)
def test_invalid_cores(cores, match):
    with pytest.raises(ValueError, match=match):
        MPO(cores, 4, 4)


def test_shape_larger_than_cores_is_refused():
    with pytest.raises(ValueError, match="does not fit"):
        MPO([torch.randn(1, 2, 2, 2), torch.randn(2, 2, 2, 1)], 5, 4)


def test_to_moves_and_casts():
    mpo = decompose(torch.randn(64, 64), max_rank=4)
    assert mpo.to(torch.float64).dtype == torch.float64
