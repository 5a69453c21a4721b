import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mpolab.shapes import factorize, padded_size, plan_factors, prime_factors


@pytest.mark.parametrize(
    "n, expected",
    [(3072, (4, 4, 8, 6, 4)), (768, (3, 4, 4, 4, 4)), (1024, (4, 4, 4, 4, 4)), (4096, (4, 4, 8, 8, 4))],
)
def test_factorize_matches_the_mpop_authors_layout(n, expected):
    assert factorize(n, 5) == expected


@given(st.integers(1, 200_000), st.integers(1, 8))
def test_factorize_product_and_centre(n, k):
    f = factorize(n, k)
    assert len(f) == k and math.prod(f) == n
    centre = k // 2
    assert f[centre] == max(f)
    # values never grow when walking away from the centre
    assert all(f[i] <= f[i + 1] for i in range(centre))
    assert all(f[i] >= f[i + 1] for i in range(centre, k - 1))


def test_prime_factors():
    assert prime_factors(30522) == [2, 3, 5087]
    assert prime_factors(1) == []


@pytest.mark.parametrize("n", [30522, 50257, 1009, 32128])
def test_awkward_sizes_are_padded_to_balanced_sizes(n):
    m = padded_size(n, 5)
    assert n < m <= 1.25 * n
    f = factorize(m, 5)
    assert max(f) <= 2 * m ** (1 / 5)


def test_well_factorising_sizes_are_not_padded():
    assert padded_size(3072, 5) == 3072 and padded_size(768, 5) == 768


def test_plan_explicit_factors():
    plan = plan_factors(3072, 768, in_factors=[3, 4, 4, 4, 4], out_factors=[4, 4, 8, 6, 4])
    assert plan.out_factors == (4, 4, 8, 6, 4) and not plan.is_padded


def test_plan_pads_awkward_size_and_reports_it():
    plan = plan_factors(30522, 384, 5)
    assert plan.is_padded and plan.padded_shape[0] > 30522 and plan.padded_shape[1] == 384


def test_explicit_padding_needs_pad_true():
    with pytest.raises(ValueError, match="pad=True"):
        plan_factors(32128, 512, out_factors=[8] * 5)
    assert plan_factors(32128, 512, out_factors=[8] * 5, pad=True).padded_shape[0] == 32768


def test_transposed_matrix_is_detected():
    with pytest.raises(ValueError, match="transposed"):
        plan_factors(768, 3072, in_factors=[3, 4, 4, 4, 4], out_factors=[4, 4, 8, 6, 4])
    with pytest.raises(ValueError, match="transposed"):
        plan_factors(768, 3072, out_factors=[4, 4, 8, 6, 4])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(out_factors=[4, 4, 8, 6, 5]), "multiply to 3840"),
        (dict(out_factors=[4, 4, 8, 6], in_factors=[3, 4, 4, 4, 4]), "entries but num_cores"),
        (dict(num_cores=1), "num_cores must be >= 2"),
        (dict(out_factors=[4, 4, 8, 6, 0]), "positive ints"),
    ],
)
def test_bad_factor_lists(kwargs, match):
    with pytest.raises(ValueError, match=match):
        plan_factors(3072, 768, **kwargs)


def test_too_many_cores_for_a_tiny_matrix():
    with pytest.raises(ValueError, match="too many"):
        plan_factors(2, 3, 5)


def test_non_int_sizes_are_type_errors():
    with pytest.raises(TypeError):
        plan_factors(3072.0, 768)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        factorize(12, "3")  # type: ignore[arg-type]
