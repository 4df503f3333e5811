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


def _reference(seed: int, shapes) -> list[torch.Tensor]:
    """What a fresh generator of the seed gives for these successive row draws."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]


@pytest.mark.parametrize(
    "shapes",
    [
        [(1, 28, 28)],  # one draw: the reseeded scratch generator
        [(3,), (3,), (5,)],  # small draws: torch caches a normal in the generator
        [(17,), (1, 28, 28), (7,)],  # a size that is not a multiple of 16 recomputes a tail
        [(2, 2), (16,), (33,), (1,)],
    ],
)
def test_every_draw_continues_each_rows_own_stream(shapes):
    seeds = [0, 11, SEED_MAX]
    noise = RowNoise(seeds)
    draws = [noise.randn((len(seeds), *s), dtype=torch.float64) for s in shapes]
    for i, seed in enumerate(seeds):
        for got, want in zip(draws, _reference(seed, shapes), strict=True):
            assert torch.equal(got[i], want)


def test_a_small_draw_leaves_nothing_in_the_scratch_generator_for_the_next_request():
    first = RowNoise([4]).randn((1, 3), dtype=torch.float64)  # an odd count caches a normal
    assert torch.equal(RowNoise([4]).randn((1, 3), dtype=torch.float64), first)
    assert torch.equal(first[0], _reference(4, [(3,)])[0])


def test_threads_draw_the_same_noise():
    import concurrent.futures

    def draw(seed):
        return RowNoise([seed, seed + 1]).randn((2, 5, 5), dtype=torch.float64)

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        got = list(pool.map(draw, [s % 7 for s in range(200)]))
    for s, x in zip(range(200), got, strict=True):
        assert torch.equal(x, draw(s % 7))
