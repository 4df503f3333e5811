import pytest
import torch

from engines.noise import SEED_MAX, RowNoise, row_seeds


def test_each_row_is_its_own_stream():
    both = RowNoise([5, 9]).randn((2, 3, 4))
    assert torch.equal(both[1], RowNoise([9]).randn((1, 3, 4))[0])
    assert not torch.equal(both[0], both[1])


def test_dtype_and_device_do_not_change_the_values():
    a = RowNoise([1]).randn((1, 8), dtype=torch.float64)
    b = RowNoise([1]).randn((1, 8), dtype=torch.float32)
    assert torch.equal(a.to(torch.float32), b)


def test_successive_draws_differ_and_repeat_per_seed():
    n1, n2 = RowNoise([3]), RowNoise([3])
    first, second = n1.randn((1, 4)), n1.randn((1, 4))
    assert not torch.equal(first, second)
    assert torch.equal(n2.randn((1, 4)), first) and torch.equal(n2.randn((1, 4)), second)


@pytest.mark.parametrize("bad", [[-1], [SEED_MAX + 1], [1.5], [True], []])
def test_bad_seeds_are_rejected(bad):
    with pytest.raises(ValueError):
        RowNoise(bad)


def test_row_count_must_match():
    with pytest.raises(ValueError, match="2 rows of noise, this request has 1"):
        RowNoise([1]).randn((2, 3))


def test_row_seeds_count_up_and_wrap():
    assert row_seeds(7, 3) == [7, 8, 9]
    assert row_seeds(SEED_MAX, 2) == [SEED_MAX, 0]
